"""Command line: `codi train | eval | probe | convert | demo | data`. Parses and calls the library."""

from __future__ import annotations

import logging
import sys

USAGE = """usage: codi COMMAND [flags]

commands:
  train     train CODI or a CoT-SFT / No-CoT-SFT baseline (reference-script flags, --config preset.yaml)
  eval      evaluate a checkpoint on GSM8k / SVAMP / GSM-Hard / MultiArith
  probe     decode the latent thoughts (top-k tokens, logit lens, Table-3 metric, HTML report)
  convert   convert an authors' reference checkpoint to this project's format
  demo      the offline end-to-end demo (synthetic data, train, evaluate, probe)
  data      data utilities (`codi data synth`)
  explore   a local web page to look at the latent thoughts of a checkpoint (needs the `explore` extra)
  lm-eval   lm-evaluation-harness with the `codi` model registered (`--model codi --model_args pretrained=DIR`)

`codi COMMAND --help` lists a command's flags."""


def _setup_logging() -> None:
    from .distributed import log_level

    # Under torchrun / accelerate launch only rank 0 logs at INFO: N ranks would print N copies.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=log_level())
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(argv: list[str]) -> int:
    from .config import parse_args
    from .distributed import close_process_group
    from .training import train

    model_args, data_args, training_args = parse_args(argv)
    result = train(model_args, data_args, training_args)
    if result.trainer.is_world_process_zero():
        print({key: value for key, value in result.metrics.items() if isinstance(value, (int, float))})
    close_process_group()
    return 0


def _delegate(module: str):
    """Commands other than train live in their own module as `main(argv) -> int`."""

    def run(argv: list[str]) -> int:
        import importlib

        return importlib.import_module(f"codi.{module}").main(argv)

    return run


COMMANDS = {
    "train": cmd_train,
    "eval": _delegate("evaluate"),
    "probe": _delegate("probe"),
    "convert": _delegate("convert"),
    "demo": _delegate("demo"),
    "data": _delegate("synth"),
    "lm-eval": _delegate("lm_eval_model"),
    "explore": _delegate("explore"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"codi: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        return COMMANDS[command](rest) or 0
    except (ValueError, OSError) as error:  # bad input, wrong path, unreachable hub: one clear line
        print(f"codi {command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `codi COMMAND [--config x.yaml] [--flag value ...]`. Parses and calls the library.

`COMMANDS` maps each command to the function that runs it (`module:function` under `codi.cli`,
imported only when that command runs: `codi --help` and `codi --version` import no torch; a command's
`--help` is cached, and torch's CPU threads are chosen before a command runs: `codi.cli.startup`). Every
command parses its flags with `codi.cli.args.parse` (typed dataclasses, `--config`, one-line errors),
except `lm-eval`, which passes lm-eval's own flags through (its `--config` YAML becomes flags).
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
from typing import NamedTuple

from . import startup


class Command(NamedTuple):
    target: str  # "module:function" under codi.cli; the function takes argv and returns the exit status
    summary: str


COMMANDS: dict[str, Command] = {
    "train": Command(
        "train:main", "train CODI, or a CoT-SFT / No-CoT-SFT baseline (--config configs/*.yaml)"
    ),
    "eval": Command("evaluate:main", "evaluate a checkpoint on GSM8k / SVAMP / GSM-Hard / MultiArith"),
    "probe": Command(
        "probe:main", "decode the latent thoughts (top-k tokens, logit lens, Table-3 metric, HTML)"
    ),
    "convert": Command("convert:main", "convert an authors' reference checkpoint to this project's format"),
    "demo": Command("demo:main", "the offline end-to-end demo (synthetic data, train, evaluate, probe)"),
    "export-smollm2": Command(
        "demo:export_smollm2", "de-quantise the offline SmolLM2-135M-Instruct into an HF folder"
    ),
    "ablate": Command(
        "ablate:main", "does the model use its latents? zero / noise / shuffle / reorder / truncate them"
    ),
    "compare": Command(
        "compare:main", "train several methods (CODI, Coconut, iCoT, CoT-SFT, No-CoT) alike; one table"
    ),
    "data synth": Command("data:synth", "write synthetic GSM8k-Aug-style data (train / validation / test)"),
    "explore": Command("explore:main", "a local web page to look inside a checkpoint's latent thoughts"),
    "lm-eval": Command(
        "lm_eval:main",
        "lm-evaluation-harness with the `codi` model (--model codi --model_args pretrained=DIR)",
    ),
}
GROUPS = sorted({name.split()[0] for name in COMMANDS if " " in name})


def usage(group: str | None = None) -> str:
    names = [name for name in COMMANDS if group is None or name.startswith(f"{group} ")]
    lines = [
        f"usage: codi {group or 'COMMAND'} {'SUBCOMMAND ' if group else ''}[--config YAML] [--FLAG VALUE ...]"
    ]
    lines += ["", "commands:"] + [f"  {name:<16}{COMMANDS[name].summary}" for name in names]
    lines += [
        "",
        "`codi COMMAND --help` lists a command's flags; every command reads --config x.yaml (flag: value).",
    ]
    if group is None:
        lines.append("`codi --version` prints the version.")
    return "\n".join(lines)


def _setup_logging() -> None:
    # Under torchrun / accelerate launch only rank 0 logs at INFO: N ranks would print N copies. No
    # process group exists yet, so the launcher's RANK is the rank (read without importing torch).
    rank = os.environ.get("RANK", "").strip() or "0"
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if rank == "0" else logging.WARNING,
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _resolve(argv: list[str]) -> tuple[str, list[str]] | int:
    """(command name, its flags), or the exit status after printing a group's usage or an error."""
    first = argv[0]
    if first in GROUPS:
        if len(argv) == 1 or argv[1] in ("-h", "--help"):
            print(usage(first), file=sys.stdout if len(argv) > 1 else sys.stderr)
            return 0 if len(argv) > 1 else 2
        first, argv = f"{first} {argv[1]}", argv[1:]
    if first not in COMMANDS:
        close = difflib.get_close_matches(first, list(COMMANDS), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        print(f"codi: unknown command {first!r}.{hint} (`codi --help` lists the commands)", file=sys.stderr)
        return 2
    return first, argv[1:]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        from .._version import __version__

        print(f"codi {__version__}")
        return 0
    resolved = _resolve(argv)
    if isinstance(resolved, int):
        return resolved
    name, rest = resolved
    module, function = COMMANDS[name].target.split(":")
    _setup_logging()

    def run() -> int:
        return getattr(importlib.import_module(f"codi.cli.{module}"), function)(rest) or 0

    try:
        if name != "lm-eval" and startup.wants_help(rest):  # lm-eval prints lm-eval's own help
            return startup.help_from_cache(name, rest, run)
        startup.configure_threads()
        return run()
    except SystemExit as done:  # `--help`: argparse printed the flags and exits
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
            return 1
        return done.code or 0
    except (ValueError, OSError, ImportError) as error:  # bad input, wrong path, missing extra: one line
        print(f"codi {name}: error: {error}", file=sys.stderr)
        return 2
    except (FloatingPointError, RuntimeError) as error:  # NonFiniteLossError, TrainingInterrupted, ...
        if type(error).__module__.startswith("codi."):  # ours carry a complete one-line message
            print(f"codi {name}: {error}", file=sys.stderr)
            return 130 if type(error).__name__ == "TrainingInterrupted" else 1
        raise

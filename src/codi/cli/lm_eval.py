"""`codi lm-eval ...`: lm-evaluation-harness's own command line with the `codi` model registered.

The flags are lm-eval's (`--model codi --model_args pretrained=DIR,mode=latent --tasks ... --limit N`);
`--config x.yaml` adds one flag per key (`tasks: gsm8k` -> `--tasks gsm8k`, a list joined by commas,
`true` -> the bare flag), before the flags given on the command line. For `--model codi`, the model
arguments are checked before lm-eval starts (it indexes its task files first, ~10 s): `pretrained` is
required and `batch_size` must be a positive integer (or lm-eval's `auto`).
"""

from __future__ import annotations

import json
import sys

from .args import UsageError, read_yaml, split_config

USAGE = """usage: codi lm-eval [--config YAML] [LM_EVAL_FLAGS ...]

lm-evaluation-harness with the `codi` model registered (needs the `lm_eval` extra):
  codi lm-eval --model codi --model_args pretrained=DIR,mode=latent --tasks gsm8k --limit 50
  --config YAML    lm-eval flags as keys (model_args, tasks, limit, include_path, output_path, ...)
model_args: pretrained=DIR (a CODI checkpoint), mode=latent|cot, batch_size=N, max_new_tokens=N
(the default answer length; a task's own max_gen_toks wins), num_latent=N.
Every other flag is lm-eval's own (`lm-eval --help`)."""


def config_flags(path: str) -> list[str]:
    """The lm-eval flags a `--config` YAML stands for."""
    flags: list[str] = []
    for key, value in read_yaml(path).items():
        if value is None or value is False:
            continue
        flags.append(f"--{key}")
        if value is not True:
            flags.append(",".join(map(str, value)) if isinstance(value, list) else str(value))
    return flags


def _flag_values(argv: list[str], *names: str) -> list[str] | None:
    """The tokens after the last of `names` (up to the next flag), `--name=value` included; None if absent."""
    found = None
    for index, token in enumerate(argv):
        flag, sep, value = token.partition("=")
        if flag in names:
            if sep:
                found = [value]
                continue
            found = []
            for following in argv[index + 1 :]:
                if following.startswith("-"):
                    break
                found.append(following)
    return found


def model_arguments(tokens: list[str]) -> dict[str, str]:
    """`--model_args` as lm-eval reads it: one JSON object, or `key=value` items (comma-separated)."""
    if len(tokens) == 1 and tokens[0].lstrip().startswith("{"):
        try:
            values = json.loads(tokens[0])
        except json.JSONDecodeError:
            values = None
        if isinstance(values, dict):
            return {str(key): str(value) for key, value in values.items()}
    items = [item for token in tokens for item in token.split(",") if item.strip()]
    return dict(item.partition("=")[::2] for item in items)


def check_batch_size(value: str, where: str) -> None:
    text = str(value).strip()
    if (
        (text.isdigit() and int(text) > 0)
        or text == "auto"
        or (text.startswith("auto:") and text[5:].isdigit())
    ):
        return
    raise UsageError(f"{where}: {value!r} is not a positive integer (or auto)")


def check_codi_arguments(argv: list[str]) -> list[str]:
    """For `--model codi`: `pretrained` given, `batch_size` (model_args or lm-eval's flag) a number.
    Returns the flags to add: a model_args batch_size also as lm-eval's `--batch_size`, so that the
    results lm-eval writes state the batch size used (the model's wins either way)."""
    model = _flag_values(argv, "--model", "-M")
    if not model or model[0] != "codi":
        return []
    args = model_arguments(_flag_values(argv, "--model_args", "-a") or [])
    if not args.get("pretrained"):
        raise UsageError(
            "--model codi needs --model_args pretrained=DIR (a CODI checkpoint folder), e.g. "
            "--model_args pretrained=runs/codi,mode=latent"
        )
    flag = _flag_values(argv, "--batch_size", "-b")
    if flag:
        check_batch_size(flag[0], "--batch_size")
    if "batch_size" in args:
        check_batch_size(args["batch_size"], "--model_args batch_size")
        if not flag:
            return ["--batch_size", args["batch_size"]]
    return []


def main(argv: list[str]) -> int:
    if not argv:
        print(USAGE, file=sys.stderr)  # nothing to run: a usage error, as for `codi data`
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    paths, rest = split_config(argv)
    flags = [flag for path in paths for flag in config_flags(path)] + rest
    flags += check_codi_arguments(flags)
    from ..io import hub

    hub.check_now()  # before lm-eval and datasets are imported: they read the offline switch then
    from ..inference.lm_eval_model import run_lm_eval_cli

    return run_lm_eval_cli(flags)

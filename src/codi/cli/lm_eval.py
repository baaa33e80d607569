"""`codi lm-eval ...`: lm-evaluation-harness's own command line with the `codi` model registered.

The flags are lm-eval's (`--model codi --model_args pretrained=DIR,mode=latent --tasks ... --limit N`);
`--config x.yaml` adds one flag per key (`tasks: gsm8k` -> `--tasks gsm8k`, a list joined by commas,
`true` -> the bare flag), before the flags given on the command line.
"""

from __future__ import annotations

import os

import yaml

USAGE = """usage: codi lm-eval [--config YAML] [LM_EVAL_FLAGS ...]

lm-evaluation-harness with the `codi` model registered (needs the `lm_eval` extra):
  codi lm-eval --model codi --model_args pretrained=DIR,mode=latent --tasks gsm8k --limit 50
  --config YAML    lm-eval flags as keys (model_args, tasks, limit, include_path, output_path, ...)
model_args: pretrained=DIR (a CODI checkpoint), mode=latent|cot, batch_size=N, max_new_tokens=N.
Every other flag is lm-eval's own (`lm-eval --help`)."""


def config_flags(path: str) -> list[str]:
    """The flags a `--config` YAML stands for."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as handle:
        values = yaml.safe_load(handle) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of lm-eval flags to values")
    flags: list[str] = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        flags.append(f"--{key}")
        if value is not True:
            flags.append(",".join(map(str, value)) if isinstance(value, list) else str(value))
    return flags


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    expanded: list[str] = []
    rest = list(argv)
    while "--config" in rest:
        index = rest.index("--config")
        if index + 1 >= len(rest):
            raise ValueError("--config needs a path to a YAML file")
        expanded += config_flags(rest[index + 1])
        del rest[index : index + 2]
    from ..lm_eval_model import run_lm_eval_cli

    return run_lm_eval_cli(expanded + rest)

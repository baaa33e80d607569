"""`codi lm-eval ...`: lm-evaluation-harness's own command line with the `codi` model registered.

The flags are lm-eval's (`--model codi --model_args pretrained=DIR,mode=latent --tasks ... --limit N`);
`--config x.yaml` adds one flag per key (`tasks: gsm8k` -> `--tasks gsm8k`, a list joined by commas,
`true` -> the bare flag), before the flags given on the command line.
"""

from __future__ import annotations

from .args import read_yaml, split_config

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


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    paths, rest = split_config(argv)
    from ..lm_eval_model import run_lm_eval_cli

    return run_lm_eval_cli([flag for path in paths for flag in config_flags(path)] + rest)

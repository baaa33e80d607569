"""`codi lm-eval ...`: lm-evaluation-harness's own command line (its flags) with the `codi` model registered."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    from ..lm_eval_model import run_lm_eval_cli

    return run_lm_eval_cli(argv)

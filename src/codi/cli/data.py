"""`codi data synth`: write synthetic GSM8k-Aug-style data (`codi.data.synth`; no torch needed).

Files already in `--out` that it would write (`train.txt`, `test.jsonl`, `synth_config.json`, ...) are
never replaced without `--overwrite`: they may be the user's own data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..data.synth import SPLITS, SynthConfig, synthesize
from .args import UsageError, parse

DESCRIPTION = (
    "Synthetic GSM8k-Aug-style word problems with equation CoTs, split into train / validation / test "
    "(disjoint by problem), written as ICoT .txt and JSONL files."
)


@dataclass
class SynthOutput:
    """Where the data goes."""

    out: str = field(
        metadata={"help": "Output folder (train/validation/test .txt and .jsonl, synth_config.json)."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Replace files of these names already in the output folder."}
    )


def existing_outputs(out_dir: str) -> list[str]:
    """The files `codi data synth` would write that already exist in `out_dir`."""
    names = [f"{split}{ext}" for split in SPLITS for ext in (".txt", ".jsonl")] + ["synth_config.json"]
    return [name for name in names if os.path.lexists(os.path.join(out_dir, name))]


def synth(argv: list[str]) -> int:
    output, config = parse("codi data synth", (SynthOutput, SynthConfig), argv, description=DESCRIPTION)
    existing = existing_outputs(output.out)
    if existing and not output.overwrite:
        raise UsageError(
            f"--out {output.out} already holds {', '.join(existing)}: pass --overwrite to replace "
            "them, or another --out"
        )
    for name, path in synthesize(output.out, config).items():
        print(f"{name}: {path}")
    return 0

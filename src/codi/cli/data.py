"""`codi data synth`: write synthetic GSM8k-Aug-style data (`codi.synth`; no torch needed)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..synth import SynthConfig, synthesize
from .args import parse

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


def synth(argv: list[str]) -> int:
    output, config = parse("codi data synth", (SynthOutput, SynthConfig), argv, description=DESCRIPTION)
    for name, path in synthesize(output.out, config).items():
        print(f"{name}: {path}")
    return 0

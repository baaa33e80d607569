"""`codi convert`: an authors' reference checkpoint -> this project's format (`codi.io.convert`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..config import CODIModelArguments
from .args import LATENT_ALIASES, optional_fields, parse

# The model settings a reference checkpoint may need spelled out, declared once in CODIModelArguments.
FROM_WEIGHTS = "Default: read from the weights."
ConvertModelSettings = optional_fields(
    "ConvertModelSettings",
    CODIModelArguments,
    (
        "prj_dim",
        "use_prj",
        "prj_no_ln",
        "use_lora",
        "lora_r",
        "lora_alpha",
        "lora_target_modules",
        "num_latent",
        "dtype",
    ),
    doc="Model settings (CODIModelArguments) the weights cannot tell, or to check against them.",
    notes={
        **dict.fromkeys(
            ("prj_dim", "use_prj", "prj_no_ln", "use_lora", "lora_r", "lora_target_modules"), FROM_WEIGHTS
        ),
        "lora_alpha": "Default: 32, the authors' value (not stored in the weights).",
    },
)


@dataclass
class ConvertArguments:
    """Convert an authors' reference CODI checkpoint (zen-E/CODI-gpt2, zen-E/CODI-llama3.2-1b-Instruct,
    or a local pytorch_model.bin / model.safetensors) to this project's format. Settings not given
    are read from the weights."""

    reference_checkpoint: str = field(
        metadata={"help": "File, folder or hub id of the reference checkpoint."}
    )
    output_dir: str = field(metadata={"help": "Where the converted checkpoint is written."})
    base_model: str | None = field(
        default=None, metadata={"help": "The LM it was trained from (default for the known hub ids)."}
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision of the reference checkpoint."})
    strict: bool = field(default=False, metadata={"help": "Refuse unused or missing keys."})
    merge_lora: bool = field(default=False, metadata={"help": "Write full weights (no base model needed)."})
    allow_base_mismatch: bool = field(
        default=False,
        metadata={"help": "Write an adapter checkpoint even if the frozen weights differ from --base_model."},
    )


def main(argv: list[str]) -> int:
    args, settings = parse(
        "codi convert", (ConvertArguments, ConvertModelSettings), argv, aliases=LATENT_ALIASES
    )
    from ..io.convert import convert_reference_checkpoint

    report = convert_reference_checkpoint(
        args.reference_checkpoint,
        args.output_dir,
        args.base_model,
        merge=args.merge_lora,
        allow_base_mismatch=args.allow_base_mismatch,
        revision=args.revision,
        strict=args.strict,
        **{key: value for key, value in dataclasses.asdict(settings).items() if value is not None},
    )
    print(report.summary())
    return 0

"""`codi probe`: decode the latent thoughts of a checkpoint on a data file (`codi.analysis.probe.run_probe`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .args import LATENT_ALIASES, UsageError, parse


@dataclass
class ProbeArguments:
    """Probe the latent thoughts (paper section 5, Table 3): top-k tokens of each latent, optionally
    after the projection and through every layer (logit lens), the Table-3 match rates, an HTML report."""

    model: str = field(metadata={"help": "CODI checkpoint: a directory or a hub id."})
    data: str = field(metadata={"help": "ICoT .txt, or GSM8k / {question, cot, answer} .jsonl."})
    output_dir: str = field(metadata={"help": "Where the records, summary, plots and HTML report go."})
    limit: int | None = field(default=None, metadata={"help": "Probe the first N records."})
    top_k: int = field(default=5, metadata={"help": "Tokens decoded per position."})
    after_projection: bool = field(default=False, metadata={"help": "Also decode the projected latents."})
    logit_lens: bool = field(default=False, metadata={"help": "Also decode every layer (logit lens)."})
    base_model: str | None = field(default=None, metadata={"help": "Base model path for a LoRA checkpoint."})
    num_latent: int | None = field(
        default=None, metadata={"help": "Latent thoughts; default: the checkpoint's num_latent."}
    )
    batch_size: int = field(default=16, metadata={"help": "Questions probed together."})
    max_new_tokens: int = field(default=256, metadata={"help": "Answer tokens to generate."})
    no_predict: bool = field(default=False, metadata={"help": "Skip generating and scoring the answers."})
    device: str | None = field(default=None, metadata={"help": "Default: cuda when available, else cpu."})

    def __post_init__(self) -> None:
        for name in ("limit", "top_k", "batch_size", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name} must be >= 1, got {value}")


def check_top_k(top_k: int, vocabulary: int) -> None:
    """--top_k past the vocabulary would silently mean "every token" (records as large as the vocabulary)."""
    if top_k > vocabulary:
        raise UsageError(f"--top_k {top_k} exceeds the model's vocabulary ({vocabulary} tokens)")


def main(argv: list[str]) -> int:
    (args,) = parse("codi probe", (ProbeArguments,), argv, aliases=LATENT_ALIASES)

    from ..analysis.probe import run_probe
    from ..data.records import read_records
    from ..distributed import local_device
    from ..io.checkpoint_checks import require_latents
    from ..io.loader import load
    from ..report import probe_table

    records = read_records(args.data)[: args.limit]
    model = load(args.model, args.base_model)
    check_top_k(args.top_k, len(model.tokenizer))
    require_latents(model, "probe")
    model.to(args.device or str(local_device()))
    summary = run_probe(
        model,
        records,
        args.output_dir,
        title=f"CODI probe: {args.model} on {args.data}",
        metadata={"model": args.model, "data": args.data},
        top_k=args.top_k,
        batch_size=args.batch_size,
        num_latent=args.num_latent,
        after_projection=args.after_projection,
        logit_lens=args.logit_lens,
        predict=not args.no_predict,
        max_new_tokens=args.max_new_tokens,
        progress=True,
    )
    print(probe_table(summary))
    for name, path in summary["paths"].items():
        print(f"{name}: {path}")
    return 0

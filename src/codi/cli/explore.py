"""`codi explore --model DIR`: serve the latent-thought explorer (`codi.explore`) on this machine."""

from __future__ import annotations

from dataclasses import dataclass, field

from .args import parse


@dataclass
class ExploreArguments:
    """A local web page to look inside a checkpoint's latent thoughts (needs the `explore` extra)."""

    model: str = field(
        metadata={"help": "CODI checkpoint: a directory (e.g. the demo's runs/demo-<time>/codi) or a hub id."}
    )
    port: int = field(default=7860, metadata={"help": "Port to serve on."})
    host: str = field(
        default="127.0.0.1", metadata={"help": "Interface to listen on (default: this machine only)."}
    )
    examples: str | None = field(
        default=None, metadata={"help": "Questions to pick from: a data file, or one question a line."}
    )
    base_model: str | None = field(
        default=None, metadata={"help": "Base model of a LoRA checkpoint, if it moved."}
    )
    top_k: int = field(default=5, metadata={"help": "Decoded tokens shown per latent."})
    max_new_tokens: int = field(default=256, metadata={"help": "Answer tokens generated at most."})
    device: str | None = field(default=None, metadata={"help": "Default: cuda when available, else cpu."})


def main(argv: list[str]) -> int:
    (args,) = parse("codi explore", (ExploreArguments,), argv)
    from ..explore import launch

    print(f"CODI explorer: http://{args.host}:{args.port} (Ctrl+C stops it)")
    launch(
        args.model,
        args.port,
        host=args.host,
        examples_file=args.examples,
        base_model=args.base_model,
        device=args.device,
        top_k=args.top_k,
        max_new_tokens=args.max_new_tokens,
    )
    return 0

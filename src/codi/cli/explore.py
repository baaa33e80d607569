"""`codi explore --model DIR`: serve the latent-thought explorer (`codi.analysis.explore`) on this machine."""

from __future__ import annotations

import ipaddress
import sys
from dataclasses import dataclass, field

from .args import UsageError, parse


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

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise UsageError(f"--port must be in 1..65535, got {self.port}")
        for name in ("top_k", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")


def exposure_warning(host: str, port: int) -> str | None:
    """The warning for a --host other machines can reach: the page runs the model for anyone there."""
    name = host.strip("[]")
    try:
        local = ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name
        local = name.lower() == "localhost"
    if local:
        return None
    reach = "every network interface of this machine" if name in ("0.0.0.0", "::") else name
    return (
        f"codi explore: warning: --host {host} serves the explorer on {reach}, port {port}: anyone who "
        "can reach it can run the model, with no password (default --host 127.0.0.1 serves this "
        "machine only; reach it from elsewhere through an SSH tunnel)"
    )


def main(argv: list[str]) -> int:
    (args,) = parse("codi explore", (ExploreArguments,), argv)
    warning = exposure_warning(args.host, args.port)
    if warning:
        print(warning, file=sys.stderr)
    from ..analysis.explore import launch

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

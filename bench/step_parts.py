"""Where the ATen ops of one CODI training step go: forward (inside the LM calls, per call, and outside
them), backward, gradient clipping, AdamW (torch's per-parameter loop, foreach, fused) and zero_grad.

    python bench/step_parts.py --model overhead --batch_size 32

Counts are exact (`host_cost.OpCounter`) and do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_step  # noqa: E402
from host_cost import OpCounter  # noqa: E402


def _count(fn) -> tuple[int, Any]:
    with OpCounter() as counter:
        result = fn()
    return counter.total, result


def forward_parts(model, batch: dict) -> dict[str, Any]:
    """Forward ops, split into those dispatched inside each call of the LM and the rest."""
    marks: list[int] = []
    counter = OpCounter()
    lm = model.hf_model
    handles = [
        lm.register_forward_pre_hook(lambda *a, **k: marks.append(-counter.total), with_kwargs=True),
        lm.register_forward_hook(lambda *a, **k: marks.append(counter.total), with_kwargs=True),
    ]
    try:
        with counter:
            out = model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    per_call = [marks[i] + marks[i + 1] for i in range(0, len(marks), 2)]
    return {
        "forward": counter.total,
        "forward_per_lm_call": per_call,
        "forward_outside_lm_calls": counter.total - sum(per_call),
        "loss": out["loss"],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model, _ = common.load_codi(args.model, args.device)
    model.train()
    trainable = [param for param in model.parameters() if param.requires_grad]
    max_tokens = 120 if args.model == "overhead" else 1000
    batch = train_step.make_batches(model, args.data, args.batch_size, 1, args.seed, max_tokens)[0]
    batch = {key: value.to(args.device) for key, value in batch.items()}
    parts = forward_parts(model, batch)
    parts["backward"], _ = _count(lambda: parts.pop("loss").backward())
    parts["clip_grad_norm"], _ = _count(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0))
    adamw = {}
    for name, kwargs in {
        "loop": {"foreach": False},
        "foreach": {"foreach": True},
        "fused": {"fused": True},
    }.items():
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.1, **kwargs)
        optimizer.step()  # the first step also creates the state
        adamw[name], _ = _count(optimizer.step)
    parts["adamw_step"] = adamw
    parts["zero_grad"], _ = _count(lambda: optimizer.zero_grad(set_to_none=True))
    parts["trainable_tensors"] = len(trainable)
    return {"bench": "step_parts", "model": args.model, "batch_size": args.batch_size, **parts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(parser)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args(argv)
    common.setup(args)
    result = run(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

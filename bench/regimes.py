"""The "overhead regime" benchmark models: a GPU's host-bound behaviour, reproduced on a CPU.

On a GPU a decoding step of SmolLM2-135M is not limited by arithmetic but by the host: Python and ATen
dispatch of every op (~10 us each), with the GPU waiting. A CPU shows the same regime when the
arithmetic per op is tiny, so these models keep the op structure (depth, heads, LoRA layout) and
shrink the width:

  smollm2-narrow  SmolLM2-135M's depth and layout: Llama, 30 layers, 9 heads / 3 KV heads, MLP
                  3 x d (8/3 there), LoRA r8 on every attention and MLP projection, at d = 72
  demo            the demo's model: Llama, 4 layers, d = 64, 4 heads, 4 x MLP, full fine-tuning

Both tokenise with the demo's word-level tokenizer built from the benchmark data (a few thousand ids,
so the LM head is small too). Random weights: speed does not depend on the values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

NAMES = ("smollm2-narrow", "demo")

# name -> (random_causal_lm shape, CODIModelArguments overrides)
_SHAPES: dict[str, tuple[dict[str, int], dict[str, Any]]] = {
    "smollm2-narrow": (
        dict(hidden=72, layers=30, heads=9, kv_heads=3, mlp_ratio=3),
        dict(use_lora=True, lora_r=8, lora_alpha=32, lora_dropout=0.1, prj_dim=72, num_latent=6),
    ),
    "demo": (
        dict(hidden=64, layers=4, heads=4, kv_heads=4, mlp_ratio=4),
        dict(use_lora=False, prj_dim=128, num_latent=4),
    ),
}


def build(name: str, target: Path, data: Path) -> None:
    """Write the model `name` (random weights, seed 0) and its tokenizer (from the records of `data`)."""
    from codi.demo.offline_models import build_tokenizer, random_causal_lm, save_model_and_tokenizer

    from codi.data.dataset import read_records

    records = read_records(str(data))
    tokenizer = build_tokenizer([f"{r.question} {r.cot} {r.answer}" for r in records])
    shape = _SHAPES[name][0]
    model = random_causal_lm(
        "llama", len(tokenizer), max_positions=1024, special_token_id=tokenizer.eos_token_id, seed=0, **shape
    )
    save_model_and_tokenizer(str(target), model, tokenizer)


def overrides(name: str) -> dict[str, Any]:
    """CODIModelArguments of `name` (its latents: inference as training)."""
    values = dict(_SHAPES[name][1])
    values["inf_latent_iterations"] = values["num_latent"]
    return values

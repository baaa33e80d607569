"""The latent loop's state (`CODIModel.encode_latents`), shared by training, decoding and probing, and
the projection that turns a last-layer state into the next latent thought."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers import DynamicCache

from .config import CODIModelArguments

# (step, latent (B, d)) -> the latent (B, d) to feed instead; see CODIModel.encode_latents
LatentTransform = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class LatentPrefix:
    """State after the question, `<bot>` and the latent thoughts, ready for the decoder tokens.

    cache: KV cache of everything fed so far.
    attention_mask: (B, past) the true padding mask of the cached positions.
    next_position: (B,) position id of the next input token per row.
    pending: (B, 1, d) the last latent embedding, not yet fed (it is fed together with the decoder
        tokens, saving one forward call), or None.
    hidden: last-layer states before the projection, after `<bot>` and after each fed latent (B, d);
        filled only when asked for (probing).
    latents: the latent embeddings fed or pending (B, d), in order.
    all_hidden: with `keep_all_layers`, for each entry of `hidden`, every entry of the LM's
        `hidden_states` (embedding output and each block's output, each (B, d)) at that position.
    """

    cache: DynamicCache
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    pending: torch.Tensor | None
    hidden: list[torch.Tensor] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    all_hidden: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


def build_projection(hidden_size: int, args: CODIModelArguments) -> nn.Module:
    """Dropout -> Linear(d, prj_dim) -> GELU -> Linear(prj_dim, d) [-> LayerNorm(d)].

    Sub-module names (`prj.1`, `prj.3`, `prj.ln`) match the reference checkpoints' keys.
    """
    if not args.use_prj:
        return nn.Identity()
    layers = OrderedDict(
        [
            ("0", nn.Dropout(args.prj_dropout)),
            ("1", nn.Linear(hidden_size, args.prj_dim)),
            ("2", nn.GELU()),
            ("3", nn.Linear(args.prj_dim, hidden_size)),
        ]
    )
    if not args.prj_no_ln:
        layers["ln"] = nn.LayerNorm(hidden_size)
    return nn.Sequential(layers)

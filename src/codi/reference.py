"""The authors' code, where it differs from this project's default: one frozen policy per model.

`--reference_compat True` reproduces the reference bug for bug (docs/method.md#reference-differences);
the default fixes each behaviour below. The policy is built once, when the model is built, and every
place that behaves differently reads its one named field.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ReferencePolicy:
    # Position ids count the left pads too (the question, latents and decoder steps of a padded row
    # start later than the same row alone).
    default_position_ids: bool = False
    # Latent steps get no attention mask: in a left-padded batch they attend to the question's pads,
    # so results depend on the batch composition.
    unmasked_latents: bool = False
    # The decoder step gets no attention mask either (the reference's `fix_attn_mask` masks it).
    unmasked_decoder: bool = False
    # Every latent is fed in its own forward call; the default feeds the last one with the decoder
    # tokens (same result, one call fewer).
    separate_last_latent: bool = False
    # Distillation targets come from a second, no-grad teacher forward (identical without dropout).
    second_teacher_forward: bool = False
    # The l2 distillation loss with `distill_loss_div_std` is divided by the teacher std twice.
    l2_divided_by_std_twice: bool = False
    # At decoding only the last embedding row is suppressed (`logits[:, :vocab - 1]`), not <bot>/<eot>/<pad>.
    suppress_last_row_only: bool = False
    # transformers 4.52 CUDA sdpa semantics for fully masked query rows: the question step's left-pad rows
    # attend to every position of their row (`question_step_mask`); the latent steps attend to those rows.
    unmask_fully_masked_rows: bool = False

    @classmethod
    def from_flags(cls, reference_compat: bool, fix_attn_mask: bool = False) -> ReferencePolicy:
        """`reference_compat` turns every behaviour on; `fix_attn_mask` (only read with it) masks the
        decoder step, as the reference's own flag does."""
        if not reference_compat:
            return cls()
        return cls(
            default_position_ids=True,
            unmasked_latents=True,
            unmasked_decoder=not fix_attn_mask,
            separate_last_latent=True,
            second_teacher_forward=True,
            l2_divided_by_std_twice=True,
            suppress_last_row_only=True,
            unmask_fully_masked_rows=True,
        )

    @property
    def is_reference(self) -> bool:
        """True when any reference behaviour is on (the question-sharing speed-up then does not apply)."""
        return self != ReferencePolicy()


def question_step_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask transformers 4.52 with sdpa on CUDA gave the first forward of a padded batch.

    attention_mask (B, L): 1 for tokens, 0 for pads -> (B, 1, L, L) of `dtype`: 0 where query i may attend
    key j (j <= i and j not a pad), `torch.finfo(dtype).min` elsewhere; then every row with no attended
    key (the query row of a left pad) becomes all 0, so it attends to every position of its row, later
    ones included (4.52's `AttentionMaskConverter._unmask_unattended` multiplies an all-min row by 0).
    Rows with an attended key are plain causal + padding. The pad rows' hidden states become the keys
    and values the reference's unmasked latent steps (and, without `fix_attn_mask`, its decoder step)
    attend to; 4.52 on CPU and transformers 5 compute those rows differently (a uniform average, zeros).

    Applied on every device and kernel (the authors' numbers came from CUDA). Only this step needs it:
    the other steps have no fully masked row (the teacher forward is right-padded, the latent steps and
    the unmasked decoder step get no mask, the masked decoder step with `fix_attn_mask` sees the
    question's tokens), so 4.52's rule changed nothing there.
    """
    length = attention_mask.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.bool()[:, None, None, :]
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)

"""The authors' code, where it differs from this project's default: one frozen policy per model.

`--reference_compat True` reproduces the reference bug for bug (docs/method.md#reference-differences);
the default fixes each behaviour below. The policy is built once, when the model is built, and every
place that behaves differently reads its one named field.
"""

from __future__ import annotations

from dataclasses import dataclass


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
        )

    @property
    def is_reference(self) -> bool:
        """True when any reference behaviour is on (the question-sharing speed-up then does not apply)."""
        return self != ReferencePolicy()

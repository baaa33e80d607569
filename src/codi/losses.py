"""CODI losses (docs/method.md#losses) as pure functions of tensors, and the settings that weigh them.

total = student_ce + distill_loss_factor * distill + ref_loss_factor * teacher_ce
        [+ latent_step_loss_factor * latent_step_ce: optional, NOT part of CODI, off by default]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of a position that carries no loss (torch's cross_entropy default)
DISTILL_LOSS_TYPES = ("smooth_l1", "l1", "l2")


@dataclass(frozen=True)
class LossSettings:
    """How the loss terms are computed and weighed. The defaults here are the only ones: the training
    arguments take theirs from this class, and `from_args` builds the settings once per run."""

    distill_loss_type: str = "smooth_l1"
    distill_loss_factor: float = 1.0  # beta
    distill_loss_div_std: bool = False
    ref_loss_factor: float = 1.0  # gamma
    # optional step supervision of the latents (not part of CODI; see latent_step_ce); 0 = off
    latent_step_loss_factor: float = 0.0

    @classmethod
    def from_args(cls, args) -> LossSettings:
        """The settings named like this class's fields on `args` (e.g. `CODITrainingArguments`)."""
        return cls(**{item.name: getattr(args, item.name) for item in fields(cls)})


@dataclass(frozen=True)
class TrainingObjective:
    """What `CODIModel.forward` computes; fixed when the model is built (`from_args` once per run)."""

    method: str = "codi"  # codi | cot_sft | no_cot_sft (the baselines train the teacher pass alone)
    loss: LossSettings = field(default_factory=LossSettings)
    # The question is the same prefix of the teacher and the student sequences: under causal attention
    # its keys/values are the same, so the student reuses the teacher's instead of recomputing them
    # (exact up to float rounding; tests/test_speed_equivalence.py). Not with the reference policy.
    share_question: bool = True

    @classmethod
    def from_args(cls, training_args) -> TrainingObjective:
        return cls(method=training_args.method, loss=LossSettings.from_args(training_args))


def next_token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-ignored labels of a batch.

    logits: (B, T, V); labels: (B, T) with IGNORE_INDEX where no loss is taken. Position t predicts
    labels[t + 1]. Normalised by the number of counted tokens in the batch, as HF causal LMs do.
    """
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = labels[:, 1:]
    return F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden: (B, T, d); positions: (B,) -> (B, d), the vector of each row at its own position."""
    rows = torch.arange(hidden.size(0), device=hidden.device)
    return hidden[rows, positions.to(hidden.device)]


def gather_layer_positions(hidden_states: Sequence[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """`gather_positions` of every layer at once: L tensors (B, T, d) -> (L, B, d). The row index is
    built once, not per layer (a training step gathers every layer twice)."""
    first = hidden_states[0]
    rows = torch.arange(first.size(0), device=first.device)
    positions = positions.to(first.device)
    return torch.stack([hidden[rows, positions] for hidden in hidden_states])


def pointwise_distance(
    student: torch.Tensor, teacher: torch.Tensor, loss_type: str, reduction: str = "mean"
) -> torch.Tensor:
    """Mean distance between (B, d) tensors: smooth_l1 (beta 1), l1 or l2 (MSE); `reduction="none"`:
    elementwise."""
    if loss_type == "smooth_l1":
        return F.smooth_l1_loss(student, teacher, beta=1.0, reduction=reduction)
    if loss_type == "l1":
        return F.l1_loss(student, teacher, reduction=reduction)
    if loss_type == "l2":
        return F.mse_loss(student, teacher, reduction=reduction)
    raise ValueError(f"unknown distill_loss_type {loss_type!r} (smooth_l1 | l1 | l2)")


def latent_step_ce(latent_logits: torch.Tensor, step_labels: torch.Tensor) -> torch.Tensor:
    """Step supervision of latent thoughts (not in CODI; cf. SIM-CoT, Wei et al. 2025).

    latent_logits: (B, K, V), the LM head applied to the last-layer state at `<bot>` and after each
    latent (K = num_latent + 1 states); step_labels: (B, S), the first token of each CoT step's result,
    IGNORE_INDEX-padded. State k is asked to predict step k's result (the state at `<bot>` the first
    step's), over the first min(K, S) pairs. Mean CE over the counted pairs; 0 when there are none.
    """
    count = min(latent_logits.size(1), step_labels.size(1))
    logits = latent_logits[:, :count].float()
    labels = step_labels[:, :count].to(logits.device)
    # sum / max(count, 1) is the mean CE, and 0 (with the graph, and DDP's gradient hooks, connected)
    # when no pair counts, without asking the device whether any does (a host sync per step)
    total = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


@dataclass
class DistillOutput:
    loss: torch.Tensor  # scalar, mean over layers
    per_layer: torch.Tensor  # (L,), detached, for logging


def distillation_loss(
    student_hidden: Sequence[torch.Tensor] | torch.Tensor,
    teacher_hidden: Sequence[torch.Tensor] | torch.Tensor,
    loss_type: str = LossSettings.distill_loss_type,
    div_std: bool = LossSettings.distill_loss_div_std,
    l2_std_twice: bool = False,
) -> DistillOutput:
    """Layer-wise distillation between student and teacher vectors at the distillation position.

    student_hidden, teacher_hidden: L tensors of shape (B, d), one per `hidden_states` entry
    (embedding output plus every block), or one (L, B, d) tensor (`gather_layer_positions`). The
    teacher is detached here, whatever the caller passed. With `div_std`, each layer's loss is divided
    by the (unbiased) std of that layer's teacher (B, d) tensor. `l2_std_twice` reproduces the
    reference's bug of dividing the l2 loss by the std twice. All layers are computed in one batch of
    ops (the same per-layer means as a loop over the layers, up to float rounding).
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student layers but {len(teacher_hidden)} teacher layers")
    student = _stacked(student_hidden).float()
    teacher = _stacked(teacher_hidden).detach().float()
    per_layer = pointwise_distance(student, teacher, loss_type, reduction="none").flatten(1).mean(dim=1)
    if div_std:
        std = teacher.flatten(1).std(dim=1)
        per_layer = per_layer / std
        if l2_std_twice and loss_type == "l2":
            per_layer = per_layer / std
    return DistillOutput(loss=per_layer.mean(), per_layer=per_layer.detach())


def _stacked(layers: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    return layers if isinstance(layers, torch.Tensor) else torch.stack(list(layers))


@dataclass
class CODILoss:
    total: torch.Tensor
    student_ce: torch.Tensor
    teacher_ce: torch.Tensor
    distill: torch.Tensor
    latent_step: torch.Tensor | None = None


def combine_losses(
    student_ce: torch.Tensor,
    teacher_ce: torch.Tensor,
    distill: torch.Tensor,
    distill_loss_factor: float = LossSettings.distill_loss_factor,
    ref_loss_factor: float = LossSettings.ref_loss_factor,
    latent_step: torch.Tensor | None = None,
    latent_step_loss_factor: float = LossSettings.latent_step_loss_factor,
) -> CODILoss:
    """total = student_ce + beta * distill + gamma * teacher_ce [+ delta * latent_step] (all scalars)."""
    total = student_ce + distill_loss_factor * distill + ref_loss_factor * teacher_ce
    if latent_step is not None:
        total = total + latent_step_loss_factor * latent_step
    return CODILoss(
        total=total, student_ce=student_ce, teacher_ce=teacher_ce, distill=distill, latent_step=latent_step
    )

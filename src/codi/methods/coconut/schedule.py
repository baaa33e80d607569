"""Coconut's settings and its stage curriculum (facebookresearch/coconut `args/*.yaml`, `run.py`).

The stage follows the epoch (the reference: epoch // epochs_per_stage) or, with `steps_per_stage` (this
project's addition for runs budgeted in optimizer steps), the optimizer step; `stage_plan` says what a
record of n CoT steps becomes at a stage.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class CoconutArguments:
    """Coconut's settings, under the reference's names (its `args/gsm_coconut.yaml`)."""

    c_thought: int = field(default=2, metadata={"help": "Continuous thoughts per removed CoT step."})
    epochs_per_stage: int = field(
        default=3, metadata={"help": "Epochs of each curriculum stage (the reference's epoch schedule)."}
    )
    steps_per_stage: int = field(
        default=0,
        metadata={
            "help": "This project's addition for step budgets: > 0 sets the stage by optimizer step, "
            "start_stage + global_step // steps_per_stage (capped at the final stage), instead of by "
            "epoch; 0: the reference's epoch schedule (epochs_per_stage, start_epoch)."
        },
    )
    start_stage: int = field(
        default=0,
        metadata={
            "help": "Stage of the first optimizer step under steps_per_stage (1 skips stage 0 when "
            "starting from a CoT-SFT checkpoint); the epoch schedule uses start_epoch instead."
        },
    )
    max_latent_stage: int = field(
        default=3,
        metadata={"help": "Last stage that adds thoughts; later stages remove every CoT step."},
    )
    pad_latent_to_max: bool = field(
        default=True,
        metadata={
            "help": "After max_latent_stage, give every record max_latent_stage x c_thought thoughts "
            "(False: one group per step it has, capped at max_latent_stage)."
        },
    )
    uniform_prob: float = field(
        default=0.0,
        metadata={"help": "Probability that a record is drawn at a uniform stage 0..#steps instead."},
    )
    reset_optimizer: bool = field(
        default=True, metadata={"help": "Clear the optimizer state (AdamW moments) at a stage switch."}
    )
    reset_optimizer_every: str = field(
        default="stage",
        metadata={
            "help": "stage (the paper: when the stage changes) | epoch (the released run.py, which "
            "recreates the optimizer at every epoch)."
        },
    )
    start_epoch: int = field(
        default=0,
        metadata={
            "help": "Curriculum epoch of the first training epoch (the reference's `resume`: 3 skips "
            "stage 0 when starting from a CoT-SFT checkpoint)."
        },
    )
    no_curriculum: bool = field(
        default=False,
        metadata={"help": "Ablation 'w/o curriculum': train on the final stage from the first epoch."},
    )
    no_thoughts: bool = field(
        default=False,
        metadata={
            "help": "Ablation 'w/o thought' (reference no_thoughts): the curriculum removes steps but "
            "adds no thoughts and no <bot>/<eot> markers."
        },
    )
    pause_as_thought: bool = field(
        default=False,
        metadata={
            "help": "Ablation 'pause as thought': a learned <pause> token embedding at every thought "
            "position instead of the fed-back hidden state."
        },
    )
    init_markers_from: str = field(
        default="<<",
        metadata={
            "help": "Initialise the <bot>/<eot> (and <pause>) embedding rows from this text's tokens, as "
            "the reference does with '<<'; '' keeps them as they are."
        },
    )

    def __post_init__(self) -> None:
        _check(self.c_thought >= 0, f"c_thought must be >= 0, got {self.c_thought}")
        _check(self.epochs_per_stage >= 1, f"epochs_per_stage must be >= 1, got {self.epochs_per_stage}")
        _check(self.max_latent_stage >= 0, f"max_latent_stage must be >= 0, got {self.max_latent_stage}")
        _check(0.0 <= self.uniform_prob <= 1.0, f"uniform_prob must be in [0, 1], got {self.uniform_prob}")
        _check(self.start_epoch >= 0, f"start_epoch must be >= 0, got {self.start_epoch}")
        _check(self.steps_per_stage >= 0, f"steps_per_stage must be >= 0, got {self.steps_per_stage}")
        _check(self.start_stage >= 0, f"start_stage must be >= 0, got {self.start_stage}")
        self._check_schedule()
        _check(
            self.reset_optimizer_every in ("stage", "epoch"),
            f"reset_optimizer_every must be stage | epoch, got {self.reset_optimizer_every!r}",
        )
        _check(
            not (self.no_thoughts and self.pause_as_thought),
            "no_thoughts and pause_as_thought are two different ablations: set at most one",
        )

    def _check_schedule(self) -> None:
        """Each schedule has its own start; a setting of the other one would be silently ignored."""
        if self.steps_per_stage == 0:
            _check(self.start_stage == 0, "start_stage applies to steps_per_stage > 0; use start_epoch")
            return
        _check(self.start_epoch == 0, "start_epoch applies to the epoch schedule; use start_stage")
        _check(
            self.reset_optimizer_every == "stage",
            "reset_optimizer_every epoch belongs to the epoch schedule; steps_per_stage resets at stages",
        )

    @property
    def by_steps(self) -> bool:
        """Whether the stage follows the optimizer step (steps_per_stage) rather than the epoch."""
        return self.steps_per_stage > 0

    @property
    def variant(self) -> str:
        """coconut | pause (pause as thought) | no_thoughts (w/o thought)."""
        return "no_thoughts" if self.no_thoughts else "pause" if self.pause_as_thought else "coconut"

    @property
    def thoughts_per_step(self) -> int:
        return 0 if self.no_thoughts else self.c_thought

    @property
    def final_stage(self) -> int:
        """The first stage that removes every step; all later stages build the same sequences."""
        return self.max_latent_stage + 1

    @property
    def inference_latents(self) -> int:
        """Thoughts fed at inference: the final stage's. (Without pad_latent_to_max the reference reads
        the number of steps of the test record's gold CoT; a question alone does not tell it.)"""
        return self.max_latent_stage * self.thoughts_per_step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# The schedule


def stage_for_epoch(
    epoch: int, epochs_per_stage: int, max_latent_stage: int, no_curriculum: bool = False
) -> int:
    """Curriculum stage of a (curriculum) epoch: epoch // epochs_per_stage, capped at the final stage
    max_latent_stage + 1 (the reference lets it grow, but every stage past max_latent_stage builds the
    same sequences). `no_curriculum`: the final stage from the start."""
    final = max_latent_stage + 1
    return final if no_curriculum else min(epoch // epochs_per_stage, final)


def stage_for_step(
    step: int, steps_per_stage: int, max_latent_stage: int, start_stage: int = 0, no_curriculum: bool = False
) -> int:
    """Curriculum stage of optimizer step `step` (0-based, the Trainer's global_step before the update):
    start_stage + step // steps_per_stage, capped at the final stage as `stage_for_epoch` is."""
    final = max_latent_stage + 1
    return final if no_curriculum else min(start_stage + step // steps_per_stage, final)


def stage_plan(stage: int, num_steps: int, args: CoconutArguments) -> tuple[int, int]:
    """(CoT steps removed, thought positions) for a record of `num_steps` steps at `stage`.

    Up to max_latent_stage: stage steps removed (all of them if the record has fewer) and stage groups of
    thoughts, whatever the record's length; later: every step removed and max_latent_stage groups
    (pad_latent_to_max) or min(num_steps, max_latent_stage) groups.
    """
    if stage > args.max_latent_stage:
        groups = args.max_latent_stage if args.pad_latent_to_max else min(num_steps, args.max_latent_stage)
        removed = num_steps
    else:
        groups, removed = stage, min(stage, num_steps)
    return removed, groups * args.thoughts_per_step


def record_stage(scheduled: int, num_steps: int, uniform_prob: float, rng: random.Random) -> int:
    """The stage one record trains at: `scheduled`, or with probability uniform_prob a uniform draw
    from 0..num_steps (the reference draws from the record's own step count, not from the stages)."""
    if rng.random() < uniform_prob:
        return rng.randrange(num_steps + 1)
    return scheduled


def mixing_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A private generator per (seed, epoch, record): the same draws in any process or worker."""
    return random.Random(f"coconut:{seed}:{epoch}:{index}")

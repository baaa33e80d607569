"""iCoT-SI: stepwise internalisation of the chain of thought (Deng et al. 2024), a Table-1 baseline.

A plain causal LM is trained like CoT-SFT on `Q ++ CoT ++ A ++ eos` while CoT tokens are removed from
every example, a few more as training goes on, until none remains; training then goes on with
`Q ++ A ++ eos` (the No-CoT-SFT view). The model answers with no CoT: `generate(..., mode="cot")`
decodes from the question, exactly as for a No-CoT-SFT model.

The authors' trainer (da03/Internalize_CoT_Step_by_Step, `src/train.py`), whose semantics and argument
names are kept:
- the scheduled count grows by one every `round(steps_per_epoch / remove_per_epoch)` steps after the
  `pretrain_epochs` (a rounded 0, i.e. more than two tokens per step, grows it every step), starting from
  `remove_start_from`; once it reaches `remove_all_when_remove_beyond` the whole CoT goes;
- during the pretraining epochs exactly `remove_start_from` tokens are removed;
- afterwards each example loses `count + offset` tokens, the offset drawn per example from
  P(k) = (1 - e^-lambda) e^(-lambda k), k < 100, the tail mass put on k = 99
  (`removal_smoothing_lambda`; inf: no offset); validation uses no offset;
- `removal_side` left: the first CoT tokens go; right: the last ones;
- `reset_optimizer`: a fresh AdamW state whenever the count changes, unless the previous batch had
  already lost its whole CoT.

Differences, by design: the schedule counts optimizer steps (the reference counts micro-batches: the
same without gradient accumulation), and `remove_every_steps` / `pretrain_steps` state it in steps
directly, so that short runs can use it; tokens are this project's tokenizer's, of this project's
preprocessed CoT, which the answer prompt follows instead of an EOS separator; a row longer than
`max_len_train` after removal leaves its batch (the reference skips the whole batch); the learning
rate follows the Trainer's schedule (the reference's is constant: `lr_scheduler_type constant`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field

import torch
from transformers import TrainerCallback

from ..trainer_inputs import CODIConfig
from ..training import CODITrainer
from .icot_data import (  # noqa: F401  (re-exported: the removal is part of this method's API)
    ICoTCollator,
    ICoTDataset,
    drop_cot_tokens,
    drop_long_rows,
    remove_from_batch,
)

logger = logging.getLogger(__name__)

INF = math.inf
OFFSET_SUPPORT = 100  # the reference's `truncate_length`: offsets 0..99


# --------------------------------------------------------------------------------------------------
# Schedule and smoothing (pure)


def tokens_removed(
    step: int,
    *,
    steps_per_removed_token: int,
    pretrain_steps: int = 0,
    remove_start_from: int = 0,
    remove_all_when_remove_beyond: float = INF,
) -> float:
    """CoT tokens removed from every example during optimizer step `step` (0-based), before the random
    offset; `inf` means all of them.

    The reference's counter: `remove_start_from + (step - pretrain_steps) // steps_per_removed_token`
    after the pretraining steps (`remove_start_from` during them); a count reaching
    `remove_all_when_remove_beyond` becomes inf. `steps_per_removed_token == 0` adds one token every
    step from step 0 on, the pretraining steps included (the reference's counter does so), although
    only `remove_start_from` tokens are removed while they last.
    """
    if step < 0 or steps_per_removed_token < 0 or pretrain_steps < 0:
        raise ValueError(
            "step, steps_per_removed_token and pretrain_steps must be >= 0, got "
            f"{step}, {steps_per_removed_token}, {pretrain_steps}"
        )
    if step < pretrain_steps:
        return remove_start_from
    if steps_per_removed_token == 0:
        count = remove_start_from + step + 1
    else:
        count = remove_start_from + (step - pretrain_steps) // steps_per_removed_token
    return INF if count >= remove_all_when_remove_beyond else count


@dataclass(frozen=True)
class RemovalSchedule:
    """`tokens_removed` with its settings; `from_epochs` converts the reference's per-epoch settings."""

    steps_per_removed_token: int
    pretrain_steps: int = 0
    remove_start_from: int = 0
    remove_all_when_remove_beyond: float = INF

    @classmethod
    def from_epochs(
        cls,
        steps_per_epoch: int,
        remove_per_epoch: float,
        pretrain_epochs: int = 0,
        remove_start_from: int = 0,
        remove_all_when_remove_beyond: float = INF,
    ) -> RemovalSchedule:
        if steps_per_epoch < 1 or remove_per_epoch <= 0:
            raise ValueError(
                f"need steps_per_epoch >= 1 and remove_per_epoch > 0, got {steps_per_epoch}, {remove_per_epoch}"
            )
        return cls(
            int(round(steps_per_epoch / remove_per_epoch)),  # Python's round, as the reference
            pretrain_epochs * steps_per_epoch,
            remove_start_from,
            remove_all_when_remove_beyond,
        )

    def tokens_removed(self, step: int) -> float:
        return tokens_removed(step, **asdict(self))

    def smoothing_active(self, step: int) -> bool:
        """Random offsets are drawn after the pretraining steps only."""
        return step >= self.pretrain_steps


def lambda_distribution(removal_smoothing_lambda: float, support: int = OFFSET_SUPPORT) -> torch.Tensor:
    """P(offset = k) for k = 0..support-1 (float64): (1 - e^-lambda) e^(-lambda k), the tail's mass added
    to the last entry; lambda = inf puts all the mass on 0."""
    if not removal_smoothing_lambda > 0:
        raise ValueError(f"removal_smoothing_lambda must be > 0, got {removal_smoothing_lambda}")
    if math.isinf(removal_smoothing_lambda):
        probs = torch.zeros(support, dtype=torch.float64)
        probs[0] = 1.0
        return probs
    k = torch.arange(support, dtype=torch.float64)
    probs = (1 - math.exp(-removal_smoothing_lambda)) * torch.exp(-removal_smoothing_lambda * k)
    probs[-1] += 1 - probs.sum()
    return probs


def sample_offsets(probs: torch.Tensor, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """`count` independent offsets (long, (count,)) drawn from `probs` (see `lambda_distribution`)."""
    return torch.multinomial(probs, count, replacement=True, generator=generator)


# --------------------------------------------------------------------------------------------------
# Arguments


@dataclass
class ICoTArguments:
    """The reference's removal settings (same names), plus their per-step forms for short runs."""

    remove_per_epoch: float = field(default=8.0, metadata={"help": "CoT tokens removed per epoch."})
    remove_every_steps: int = field(
        default=0,
        metadata={
            "help": "> 0: remove one more token every this many optimizer steps (overrides remove_per_epoch)."
        },
    )
    remove_all_when_remove_beyond: float = field(
        default=INF, metadata={"help": "Remove the whole CoT once the count reaches this (inf: never)."}
    )
    removal_smoothing_lambda: float = field(
        default=INF, metadata={"help": "Random extra removal, P(k) ~ exp(-lambda k) (inf: none; GSM8k: 4)."}
    )
    removal_side: str = field(default="left", metadata={"help": "left | right: which end of the CoT goes."})
    pretrain_epochs: int = field(
        default=0, metadata={"help": "Epochs with remove_start_from tokens removed."}
    )
    pretrain_steps: int = field(
        default=-1,
        metadata={"help": ">= 0: the pretraining length in optimizer steps (overrides pretrain_epochs)."},
    )
    remove_start_from: int = field(default=0, metadata={"help": "Tokens removed from the start."})
    reset_optimizer: bool = field(
        default=True,
        metadata={
            "help": "Fresh AdamW state whenever the count changes (every run of the reference's README)."
        },
    )
    max_len_train: int = field(
        default=-1, metadata={"help": "> 0: rows longer than this after removal leave the batch."}
    )

    def __post_init__(self) -> None:
        self.remove_all_when_remove_beyond = float(self.remove_all_when_remove_beyond)
        self.removal_smoothing_lambda = float(self.removal_smoothing_lambda)
        problems = [
            (self.remove_per_epoch > 0, f"remove_per_epoch must be > 0, got {self.remove_per_epoch}"),
            (self.remove_every_steps >= 0, f"remove_every_steps must be >= 0, got {self.remove_every_steps}"),
            (self.removal_smoothing_lambda > 0, "removal_smoothing_lambda must be > 0 (inf: no smoothing)"),
            (
                self.removal_side in ("left", "right"),
                f"removal_side must be left|right, got {self.removal_side!r}",
            ),
            (self.pretrain_epochs >= 0, f"pretrain_epochs must be >= 0, got {self.pretrain_epochs}"),
            (self.remove_start_from >= 0, f"remove_start_from must be >= 0, got {self.remove_start_from}"),
            (self.remove_all_when_remove_beyond > 0, "remove_all_when_remove_beyond must be > 0"),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(message)

    def schedule(self, steps_per_epoch: int) -> RemovalSchedule:
        """The schedule in optimizer steps; `steps_per_epoch` converts the per-epoch settings."""
        by_epochs = RemovalSchedule.from_epochs(
            steps_per_epoch,
            self.remove_per_epoch,
            self.pretrain_epochs,
            self.remove_start_from,
            self.remove_all_when_remove_beyond,
        )
        return RemovalSchedule(
            self.remove_every_steps or by_epochs.steps_per_removed_token,
            self.pretrain_steps if self.pretrain_steps >= 0 else by_epochs.pretrain_steps,
            self.remove_start_from,
            self.remove_all_when_remove_beyond,
        )


def optimizer_steps_per_epoch(
    num_examples: int, per_device_batch_size: int, gradient_accumulation_steps: int = 1, world_size: int = 1
) -> int:
    """Optimizer steps in one epoch, as the HF Trainer counts them."""
    batches = math.ceil(math.ceil(num_examples / world_size) / per_device_batch_size)
    return max(math.ceil(batches / gradient_accumulation_steps), 1)


# --------------------------------------------------------------------------------------------------
# Training: the removal state, the optimizer reset, the trainer


def reset_optimizer_state(optimizer) -> None:
    """Forget the moments and step counts (as the reference's fresh AdamW); the parameter groups, whose
    learning rate the scheduler sets, stay. Unwraps accelerate's optimizer wrapper."""
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    inner.state.clear()


class ICoTRemoval:
    """The removal during one training run: the count per step, the seeded offsets, the resets."""

    def __init__(self, args: ICoTArguments, schedule: RemovalSchedule, pad_id: int, seed: int = 0):
        self.args = args
        self.schedule = schedule
        self.pad_id = pad_id
        self.probs = lambda_distribution(args.removal_smoothing_lambda)
        self.generator = torch.Generator().manual_seed(seed)
        self.count: float | None = None
        self.all_removed_in_prev_batch = False
        self.changes: list[tuple[int, float]] = []  # (step, new count)
        self.resets: list[int] = []  # steps at whose start the optimizer state was reset

    def on_step_begin(self, step: int, optimizer) -> None:
        """Update the count for optimizer step `step`; reset the optimizer when it changes."""
        count = self.schedule.tokens_removed(step)
        if self.count is not None and count != self.count:
            self.changes.append((step, count))
            if self.args.reset_optimizer and not self.all_removed_in_prev_batch and optimizer is not None:
                reset_optimizer_state(optimizer)
                self.resets.append(step)
                logger.info("step %d: removing %s CoT tokens; optimizer state reset", step, count)
        self.count = count

    def transform(self, batch: dict, step: int, training: bool) -> dict:
        """The batch with its CoT tokens removed (offsets only in training after the pretraining)."""
        if "cot_start" not in batch:
            return batch
        count = self.schedule.tokens_removed(step)
        rows = batch["teacher_input_ids"].shape[0]
        counts = torch.full((rows,), float(count))
        if (
            training
            and self.schedule.smoothing_active(step)
            and not math.isinf(self.args.removal_smoothing_lambda)
        ):
            counts = counts + sample_offsets(self.probs, rows, self.generator).double()
        batch, all_removed = remove_from_batch(batch, counts, self.args.removal_side, self.pad_id)
        if training:
            self.all_removed_in_prev_batch = all_removed
            if self.args.max_len_train > 0:
                batch = drop_long_rows(batch, self.args.max_len_train)
        return batch

    def summary(self) -> dict:
        return {
            "schedule": {key: str(value) for key, value in asdict(self.schedule).items()},
            "count_changes": [[step, str(count)] for step, count in self.changes],
            "optimizer_resets": self.resets,
            "final_count": str(self.count),
        }


class ICoTCallback(TrainerCallback):
    """Calls `ICoTRemoval.on_step_begin` at the start of every optimizer step."""

    def __init__(self, removal: ICoTRemoval):
        self.removal = removal

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.removal.on_step_begin(state.global_step, optimizer)


@dataclass
class ICoTConfig(CODIConfig, ICoTArguments):
    """`CODIConfig` with iCoT-SI's removal settings (`ICoTArguments`); the method is icot."""

    METHOD_PARTS = (ICoTArguments,)
    method: str = field(
        default="icot",
        metadata={"help": "icot (or cot_sft: the same loss); iCoT's flags are listed with the others."},
    )

    def __post_init__(self, inf_latent_iterations: int | None = None) -> None:
        if self.method not in ("icot", "cot_sft"):
            raise ValueError(f"iCoT: method must be icot (or cot_sft), got {self.method!r}")
        super().__post_init__(inf_latent_iterations)


class ICoTTrainer(CODITrainer):
    """`CODITrainer` whose `compute_loss` first applies the removal (`icot`, an `ICoTRemoval`).

    Built from an `ICoTConfig`, the model is a plain causal LM trained on the CoT-SFT view, the removal
    schedule follows the training set's optimizer steps per epoch and `ICoTCallback` runs first."""

    config_class = ICoTConfig

    def __init__(self, *args, icot: ICoTRemoval | None = None, **kwargs):
        self.icot = icot
        super().__init__(*args, **kwargs)

    def build_datasets(self, model, train_dataset, eval_dataset):
        train_set, eval_set = super().build_datasets(model, train_dataset, eval_dataset)
        train_set = ICoTDataset(train_set.examples)
        eval_set = ICoTDataset(eval_set.examples) if eval_set is not None else None
        config = self.config
        steps_per_epoch = optimizer_steps_per_epoch(
            len(train_set),
            config.per_device_train_batch_size,
            config.gradient_accumulation_steps,
            config.world_size,
        )
        settings = config.method_args()
        self.icot = ICoTRemoval(settings, settings.schedule(steps_per_epoch), model.pad_id, config.seed)
        logger.info("iCoT: %d steps per epoch, schedule %s", steps_per_epoch, self.icot.schedule)
        return train_set, eval_set

    def collator(self, model):
        return ICoTCollator(model.pad_id)

    def method_callbacks(self) -> list:
        return [ICoTCallback(self.icot)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = self.icot.transform(inputs, self.state.global_step, training=model.training)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def result(self, metrics: dict):
        """The run's result; `icot_state.json` in `output_dir` records the schedule and resets."""
        if self.is_world_process_zero():
            settings = {k: str(v) for k, v in asdict(self.config.method_args()).items()}
            with open(os.path.join(self.args.output_dir, "icot_state.json"), "w") as handle:
                json.dump({"icot_args": settings, **self.icot.summary()}, handle, indent=2)
        metrics["icot"] = self.icot.summary()
        return super().result(metrics)


def train_icot(model_args, data_args, training_args, icot_args: ICoTArguments):
    """Train iCoT-SI (a causal LM, CoT-SFT objective, CoT removed gradually); save to `output_dir`
    (`ICoTTrainer.run` with the settings as one `ICoTConfig`).

    `training_args.method` is "icot" or "cot_sft" (the loss is the teacher CE either way). Returns the
    training module's `TrainResult`; `icot_state.json` in `output_dir` records the schedule and resets.
    """
    return ICoTTrainer.run(ICoTConfig.from_parts(model_args, data_args, training_args, icot_args))

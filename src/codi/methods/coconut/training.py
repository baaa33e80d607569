"""Coconut training on the HF Trainer: the stage curriculum and the optimizer resets as a callback.

    CoconutTrainer(model="gpt2", args=CoconutConfig(output_dir="runs/x", c_thought=2), train_dataset=ds)
    train_coconut(model_args, data_args, training_args, CoconutArguments(c_thought=2, ...))  # the same

The reference's schedule: each epoch the callback sets the stage (start_epoch + epoch) // epochs_per_stage
on the datasets. With `steps_per_stage` > 0 (this project's addition, for runs budgeted in optimizer
steps) it sets start_stage + global_step // steps_per_stage at the start of every optimizer step; the
stage derives from global_step alone, so a resumed run trains each step at the stage it would have had.
When the stage changes (or every epoch, `reset_optimizer_every epoch`) the callback clears the optimizer
state: AdamW then restarts with no moments and a step count of 0, as a newly built one does (the
reference rebuilds it). The learning-rate schedule runs over the whole training; the reference uses none
(constant), which the preset sets.

The training dataloader yields record indices only (`RecordIndices`): `CoconutTrainer` builds each
micro-batch's sequences when the step trains on it, so every step trains at its own stage although the
Trainer and accelerate fetch batches ahead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import TrainerCallback

from ... import trainer_inputs
from ...config import CODIDataArguments, CODIModelArguments, CODITrainingArguments
from ...data.dataset import DataStats
from ...trainer_inputs import CODIConfig, build_splits
from ...training import CODITrainer, TrainResult
from .data import CoconutCollator, CoconutDataset, MarkerIds, RecordIndices, tokenize_records
from .model import CoconutModel, build_coconut_model
from .schedule import CoconutArguments, stage_for_epoch, stage_for_step

logger = logging.getLogger(__name__)


def _epoch_index(state) -> int:
    # state.epoch is exactly the epoch index at an epoch's start, fractional when resuming mid-epoch
    return math.floor(float(state.epoch or 0.0) + 1e-6)


def clear_optimizer_state(optimizer) -> None:
    if optimizer is None or not hasattr(optimizer, "state"):
        raise ValueError(
            "reset_optimizer: this optimizer exposes no state to clear; set reset_optimizer False"
        )
    optimizer.state.clear()


class CurriculumCallback(TrainerCallback):
    """Sets the stage on the datasets (per epoch, or per optimizer step under steps_per_stage) and resets
    the optimizer state at stage switches.

    `history` records, per epoch begun (epoch schedule) or per stage begun (step schedule; its first
    step included): the trainer epoch (and step), the stage and whether the state was cleared.
    """

    def __init__(self, settings: CoconutArguments, datasets: Sequence[CoconutDataset | None]):
        self.settings = settings
        self.datasets = [dataset for dataset in datasets if dataset is not None]
        self.history: list[dict] = []

    def stage(self, epoch: int) -> int:
        """Stage of trainer epoch `epoch` (0-based) under the epoch schedule."""
        s = self.settings
        return stage_for_epoch(s.start_epoch + epoch, s.epochs_per_stage, s.max_latent_stage, s.no_curriculum)

    def step_stage(self, step: int) -> int:
        """Stage of optimizer step `step` (global_step before its update) under steps_per_stage."""
        s = self.settings
        return stage_for_step(step, s.steps_per_stage, s.max_latent_stage, s.start_stage, s.no_curriculum)

    def _apply(self, stage: int, curriculum_epoch: int) -> None:
        for dataset in self.datasets:
            dataset.set_stage(stage, curriculum_epoch)

    def _set_stage(self, state) -> tuple[float, int, int]:
        """(progress, epoch, stage) of the epoch schedule, with the stage set on the datasets."""
        progress, epoch = float(state.epoch or 0.0), _epoch_index(state)
        stage = self.stage(epoch)
        self._apply(stage, self.settings.start_epoch + epoch)
        return progress, epoch, stage

    def on_train_begin(self, args, state, control, **kwargs):
        # before any evaluation on start; a resumed run starts at its checkpoint's stage
        if self.settings.by_steps:
            self._apply(self.step_stage(state.global_step), _epoch_index(state))
        else:
            self._set_stage(state)

    def on_epoch_begin(self, args, state, control, optimizer=None, **kwargs):
        if self.settings.by_steps:
            return
        progress, epoch, stage = self._set_stage(state)
        switch = epoch > 0 and (
            self.settings.reset_optimizer_every == "epoch" or stage != self.stage(epoch - 1)
        )
        reset = self.settings.reset_optimizer and switch and abs(progress - epoch) < 1e-6
        if reset:
            clear_optimizer_state(optimizer)
        self.history.append({"epoch": epoch, "stage": stage, "reset": reset})
        logger.info(
            "coconut: epoch %d (curriculum epoch %d), stage %d%s",
            epoch,
            self.settings.start_epoch + epoch,
            stage,
            ", optimizer state cleared" if reset else "",
        )

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if not self.settings.by_steps:
            return
        step, epoch = state.global_step, _epoch_index(state)
        stage = self.step_stage(step)
        self._apply(stage, epoch)
        # from the step alone: a run resumed at a switch step clears the state the uninterrupted run did
        switch = step > 0 and stage != self.step_stage(step - 1)
        if self.history and not switch:
            return  # history and log: once per stage
        reset = self.settings.reset_optimizer and switch
        if reset:
            clear_optimizer_state(optimizer)
        self.history.append({"step": step, "epoch": epoch, "stage": stage, "reset": reset})
        logger.info("coconut: step %d, stage %d%s", step, stage, ", optimizer state cleared" if reset else "")


@dataclass
class CoconutConfig(CODIConfig, CoconutArguments):
    """`CODIConfig` with Coconut's settings (`CoconutArguments`); the method is coconut."""

    METHOD_PARTS = (CoconutArguments,)
    method: str = field(
        default="coconut", metadata={"help": "coconut: Coconut's flags are listed with the others."}
    )
    num_latent: int | None = field(
        default=None,
        metadata={
            "help": "Thoughts fed at inference: c_thought x max_latent_stage (the final stage's), the "
            "default and the only value accepted (`codi eval --num_latent` decodes with another)."
        },
    )

    def __post_init__(self, inf_latent_iterations: int | None = None) -> None:
        thoughts = self.inference_latents
        if inf_latent_iterations is not None:  # the alias
            self.num_latent = inf_latent_iterations
        if self.num_latent is None:
            self.num_latent = thoughts
        elif self.num_latent != thoughts:
            # the curriculum decides the thoughts trained; a recorded count that differs would be decoded
            raise ValueError(
                f"num_latent {self.num_latent}: Coconut trains c_thought x max_latent_stage = "
                f"{self.c_thought} x {self.max_latent_stage} = {thoughts} thoughts (w/o thought: 0); set "
                "those, or leave num_latent out (decode with another count: codi eval --num_latent N)"
            )
        super().__post_init__()


class CoconutTrainer(CODITrainer):
    """`CODITrainer` that builds a training micro-batch (record indices, see `RecordIndices`) at the
    stage set for the step that trains on it; evaluation batches come built from the eval dataset.

    Built from a `CoconutConfig`, the model is a `CoconutModel` (from a base LM or a CoT-SFT checkpoint,
    Coconut's stage 0) and the stage curriculum runs as the first callback (`curriculum`)."""

    config_class = CoconutConfig

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "record_index" in inputs:
            batch = self.train_dataset.collate(inputs["record_index"], self.data_collator)
            inputs = self._prepare_inputs(batch)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def build_model(self, model):
        model_args = trainer_inputs.model_arguments(model, self.config)
        if model_args is None:
            trainer_inputs.check_model(model, CoconutModel, type(self).__name__)
            return model
        return build_coconut_model(model_args, self.config.method_args())[0]

    def build_datasets(self, model, train_dataset, eval_dataset):
        config = self.config
        if config.dataloader_persistent_workers and config.dataloader_num_workers > 0:
            # the Trainer keeps persistent evaluation workers, each with a copy of the dataset's first stage
            raise ValueError(
                "coconut: dataloader_persistent_workers would keep the first stage in eval workers"
            )
        if train_dataset is not None and not trainer_inputs.is_rows(train_dataset):
            raise TypeError(
                "CoconutTrainer: pass the training data as rows (a datasets.Dataset) or in the config"
            )
        train_set, self.train_stats, eval_set, self.eval_stats = build_coconut_datasets(
            model,
            config.data_args(),
            config.method_args(),
            config.seed,
            *self.records(train_dataset, eval_dataset),
        )
        self.curriculum = CurriculumCallback(config.method_args(), [train_set, eval_set])
        return RecordIndices(train_set), eval_set

    def collator(self, model):
        return CoconutCollator(model.pad_id)

    def method_callbacks(self) -> list:
        return [self.curriculum]

    @staticmethod
    def prepare_args(args) -> None:
        args.label_names = ["labels"]
        args.prediction_loss_only = True

    def extra_metrics(self) -> dict:
        return {"coconut_stages": [entry["stage"] for entry in self.curriculum.history]}

    def result(self, metrics: dict) -> TrainResult:
        logger.info("coconut: stages %s", self.curriculum.history)
        return TrainResult(self.model.eval(), self, self.train_stats, self.eval_stats, metrics)


def build_coconut_datasets(
    model: CoconutModel,
    data_args: CODIDataArguments,
    settings: CoconutArguments,
    seed: int,
    train_records: list | None = None,
    eval_records: list | None = None,
) -> tuple[CoconutDataset, DataStats, CoconutDataset | None, DataStats | None]:
    """Training and validation sets from the records given, or else from the files or hub dataset that
    `data_args` names."""
    common = dict(
        cot_style=data_args.cot_style,
        include_last_cot=data_args.include_last_cot,
        max_token_num=data_args.max_token_num,
        skip_negative_answers=data_args.skip_negative_answers,
        answer_prompt=model.args.answer_prompt,
    )
    ids = MarkerIds(model.bot_id, model.eot_id, model.pause_id)

    def build(records, max_samples, name):
        tokenized, stats = tokenize_records(
            records, model.tokenizer, max_samples=max_samples, name=name, **common
        )
        return CoconutDataset(tokenized, settings, ids, seed), stats

    return build_splits(data_args, build, train_records, eval_records)


def train_coconut(
    model_args: CODIModelArguments,
    data_args: CODIDataArguments,
    training_args: CODITrainingArguments,
    coconut_args: CoconutArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Train Coconut (or an ablation) with the stage curriculum, then save the model to `output_dir`
    (`CoconutTrainer.run` with the settings as one `CoconutConfig`; `model_args.num_latent` is not
    read: the thoughts are c_thought x max_latent_stage).

    `model_name_or_path` is usually a CoT-SFT checkpoint of this project (Coconut's stage 0; start at
    `start_epoch` = epochs_per_stage, or `start_stage` 1 under steps_per_stage, to skip that stage).
    `callbacks` run after the curriculum's.
    """
    # the thought count follows the curriculum, whatever `model_args.num_latent` says
    config = CoconutConfig.from_parts(model_args, data_args, training_args, coconut_args, num_latent=None)
    return CoconutTrainer.run(config, callbacks=list(callbacks))

"""Coconut training on the HF Trainer: the stage curriculum and the optimizer resets as a callback.

from codi.methods.coconut import CoconutArguments, train_coconut
train_coconut(model_args, data_args, training_args, CoconutArguments(c_thought=2, ...))

Each epoch the callback sets the stage (start_epoch + epoch) // epochs_per_stage on the datasets and,
when the stage changes (or every epoch, `reset_optimizer_every epoch`), clears the optimizer state:
AdamW then restarts with no moments and a step count of 0, as a newly built one does (the reference
rebuilds it). The learning-rate schedule runs over the whole training; the reference uses none
(constant), which the preset sets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from transformers import TrainerCallback

from ...config import CODIDataArguments, CODIModelArguments, CODITrainingArguments
from ...data import DataStats, load_records
from ...training import CODITrainer, TrainResult, fit_and_save, start_run
from .data import (
    CoconutArguments,
    CoconutCollator,
    CoconutDataset,
    MarkerIds,
    stage_for_epoch,
    tokenize_records,
)
from .model import CoconutModel, build_coconut_model

logger = logging.getLogger(__name__)


class CurriculumCallback(TrainerCallback):
    """Sets each epoch's stage on the datasets and resets the optimizer state at stage switches.

    `history` records, per epoch begun: the trainer epoch, its stage and whether the state was cleared.
    """

    def __init__(self, settings: CoconutArguments, datasets: Sequence[CoconutDataset | None]):
        self.settings = settings
        self.datasets = [dataset for dataset in datasets if dataset is not None]
        self.history: list[dict] = []

    def stage(self, epoch: int) -> int:
        """Stage of trainer epoch `epoch` (0-based)."""
        s = self.settings
        return stage_for_epoch(s.start_epoch + epoch, s.epochs_per_stage, s.max_latent_stage, s.no_curriculum)

    def _set_stage(self, state) -> tuple[float, int, int]:
        """(progress, epoch, stage) from the trainer state, with the stage set on the datasets."""
        # state.epoch is exactly the epoch index at an epoch's start, fractional when resuming mid-epoch
        progress = float(state.epoch or 0.0)
        epoch = math.floor(progress + 1e-6)
        stage = self.stage(epoch)
        for dataset in self.datasets:
            dataset.set_stage(stage, self.settings.start_epoch + epoch)
        return progress, epoch, stage

    def on_train_begin(self, args, state, control, **kwargs):
        self._set_stage(state)  # before any evaluation on start

    def on_epoch_begin(self, args, state, control, optimizer=None, **kwargs):
        progress, epoch, stage = self._set_stage(state)
        switch = epoch > 0 and (
            self.settings.reset_optimizer_every == "epoch" or stage != self.stage(epoch - 1)
        )
        reset = self.settings.reset_optimizer and switch and abs(progress - epoch) < 1e-6
        if reset:
            if optimizer is None or not hasattr(optimizer, "state"):
                raise ValueError(
                    "reset_optimizer: this optimizer exposes no state to clear; set reset_optimizer False"
                )
            optimizer.state.clear()
        self.history.append({"epoch": epoch, "stage": stage, "reset": reset})
        logger.info(
            "coconut: epoch %d (curriculum epoch %d), stage %d%s",
            epoch,
            self.settings.start_epoch + epoch,
            stage,
            ", optimizer state cleared" if reset else "",
        )


def build_coconut_datasets(
    model: CoconutModel, data_args: CODIDataArguments, settings: CoconutArguments, seed: int
) -> tuple[CoconutDataset, DataStats, CoconutDataset | None, DataStats | None]:
    source = data_args.train_file or data_args.data_name
    if source is None:
        raise ValueError("no training data: pass --train_file PATH or --data_name HUB_ID")
    common = dict(
        cot_style=data_args.cot_style,
        include_last_cot=data_args.include_last_cot,
        max_token_num=data_args.max_token_num,
        skip_negative_answers=data_args.skip_negative_answers,
        answer_prompt=model.args.answer_prompt,
    )
    ids = MarkerIds(model.bot_id, model.eot_id, model.pause_id)
    records, train_stats = tokenize_records(
        load_records(source, "train"), model.tokenizer, max_samples=data_args.max_train_samples, **common
    )
    eval_source = data_args.validation_file or (data_args.data_name if data_args.validation_split else None)
    if eval_source is None:
        return CoconutDataset(records, settings, ids, seed), train_stats, None, None
    eval_records, eval_stats = tokenize_records(
        load_records(eval_source, data_args.validation_split or "validation"),
        model.tokenizer,
        max_samples=data_args.max_eval_samples,
        name="validation",
        **common,
    )
    return (
        CoconutDataset(records, settings, ids, seed),
        train_stats,
        CoconutDataset(eval_records, settings, ids, seed),
        eval_stats,
    )


def train_coconut(
    model_args: CODIModelArguments,
    data_args: CODIDataArguments,
    training_args: CODITrainingArguments,
    coconut_args: CoconutArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainResult:
    """Train Coconut (or an ablation) with the stage curriculum, then save the model to `output_dir`.

    `model_name_or_path` is usually a CoT-SFT checkpoint of this project (Coconut's stage 0; start at
    `start_epoch` = epochs_per_stage to skip that stage). `callbacks` run after the curriculum's.
    """
    resume, signature = start_run(model_args, data_args, training_args, coconut_args)
    if training_args.dataloader_persistent_workers and training_args.dataloader_num_workers > 0:
        raise ValueError(
            "coconut: dataloader_persistent_workers would keep the first epoch's stage in the workers"
        )
    model, _ = build_coconut_model(model_args, coconut_args)
    train_set, train_stats, eval_set, eval_stats = build_coconut_datasets(
        model, data_args, coconut_args, training_args.seed
    )
    if eval_set is None and training_args.eval_strategy != "no":
        raise ValueError("eval_strategy is set but there is no validation data (--validation_file)")
    training_args.label_names = ["labels"]
    training_args.prediction_loss_only = True
    curriculum = CurriculumCallback(coconut_args, [train_set, eval_set])
    trainer = CODITrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=CoconutCollator(model.pad_id),
        callbacks=[curriculum, *callbacks],
        run_signature=signature,
    )
    stages = lambda: {"coconut_stages": [entry["stage"] for entry in curriculum.history]}  # noqa: E731
    metrics = fit_and_save(trainer, resume, train_stats, stages)
    logger.info("coconut: stages %s", curriculum.history)
    return TrainResult(model.eval(), trainer, train_stats, eval_stats, metrics)

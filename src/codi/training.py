"""Training: setup -> fit -> validate -> save, on the HF Trainer (so DDP/FSDP/DeepSpeed work unchanged).

from codi import train
train(model_args, data_args, training_args)       # or: codi train --config configs/gpt2_gsm8k-aug.yaml
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers import Trainer, set_seed

from .checkpoint import write_json_atomically
from .config import CODIDataArguments, CODIModelArguments, CODITrainingArguments
from .data import CODICollator, CODIDataset, DataStats, build_dataset
from .hf import max_positions
from .losses import TrainingObjective
from .model import CODIModel
from .records import load_records
from .run_safety import (
    SafeCheckpoints,
    acquire_run_lock,
    check_training_data,
    records_fingerprint,
    release_run_lock,
)
from .runs import (
    RUN_FILE,
    check_max_steps,
    check_resume_compatible,
    checkpoint_problem,
    last_complete_checkpoint,
    prepare_output_dir,
    refuse_finished_run,
    refuse_foreign_checkpoints,
    run_signature,
)

logger = logging.getLogger(__name__)
COMPONENTS = ("student_ce", "teacher_ce", "distill_loss", "latent_step_ce")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; raised with the step so the run can be resumed or fixed."""


class CODITrainer(SafeCheckpoints, Trainer):
    """HF Trainer that logs every loss component and saves/loads CODI checkpoints."""

    def __init__(self, *args, run_signature: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.run_signature = run_signature  # written into every checkpoint (see codi.runs)
        self._sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._counts = {"train": 0, "eval": 0}

    def _get_train_sampler(self, train_dataset=None):
        """`train_sampling_strategy="group_by_length"`: batches of similar teacher length (less padding).

        HF infers lengths from an `input_ids` key, which CODI features do not have: pass the lengths of
        the pre-tokenised teacher sequences (each example's longest view) instead.
        """
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and isinstance(dataset, CODIDataset):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(
                self.args.train_batch_size * self.args.gradient_accumulation_steps,
                lengths=[len(example.teacher_input_ids) for example in dataset.examples],
            )
        return super()._get_train_sampler(train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        loss = outputs["loss"]
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"non-finite loss at global step {self.state.global_step}: "
                + ", ".join(f"{key}={float(outputs[key]):.4g}" for key in COMPONENTS if key in outputs)
                + ". Lower the learning rate, use bf16 instead of fp16, or resume from the last checkpoint."
            )
        phase = "train" if model.training else "eval"
        for key in COMPONENTS:
            if key in outputs:
                self._sums[phase][key] += float(outputs[key])
        self._counts[phase] += 1
        return (loss, outputs) if return_outputs else loss

    def _pop_means(self, phase: str, prefix: str = "") -> dict[str, float]:
        count = self._counts[phase]
        sums = dict(self._sums[phase])
        self._sums[phase].clear()
        self._counts[phase] = 0
        if self.args.world_size > 1 and torch.distributed.is_initialized():
            # Each rank saw only its own micro-batches: sum over ranks so rank 0 logs the global mean.
            # Safe as a collective: log() (with "loss") and evaluate() run on every rank together.
            totals = torch.tensor(
                [count] + [sums.get(key, 0.0) for key in COMPONENTS],
                dtype=torch.float64,
                device=self.args.device,
            )
            totals = self.accelerator.reduce(totals, reduction="sum").tolist()
            # a component is logged on every rank or none (the settings are the same everywhere)
            count = int(totals[0])
            sums = {key: total for key, total in zip(COMPONENTS, totals[1:]) if key in sums}
        return {f"{prefix}{key}": value / count for key, value in sums.items()} if count else {}

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update({key: round(value, 4) for key, value in self._pop_means("train").items()})
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._pop_means("eval")
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        components = self._pop_means("eval", prefix=f"{metric_key_prefix}_")
        if components:
            metrics.update(components)
            self.log(components)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:  # rank 0 only (the Trainer gathered any sharded weights before)
            return
        if state_dict is not None and not state_dict:
            # DeepSpeed ZeRO-3 without stage3_gather_16bit_weights_on_model_save: no full weights exist
            # anywhere; the Trainer writes DeepSpeed's own shards instead (see docs/distributed.md).
            logger.warning("%s: no gathered weights (ZeRO-3), CODI files not written", output_dir)
            return
        # FSDP (FULL_STATE_DICT) and ZeRO-3 shard the live parameters; they pass the gathered `state_dict`.
        self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, state_dict=state_dict)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        if self.run_signature is not None:
            write_json_atomically(os.path.join(output_dir, RUN_FILE), self.run_signature)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            # Sharded engines resume from their own files (pytorch_model_fsdp*, global_step*), which the
            # Trainer writes into every checkpoint; our files hold full tensors that cannot be loaded
            # into sharded parameters.
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        logger.info("Loading weights from %s", resume_from_checkpoint)
        target.load_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            super()._load_best_model()
            return
        self._load_from_checkpoint(self.state.best_model_checkpoint)


@dataclass
class TrainResult:
    model: CODIModel
    trainer: CODITrainer
    train_stats: DataStats
    eval_stats: DataStats | None
    metrics: dict


def build_model(model_args: CODIModelArguments, training_args: CODITrainingArguments) -> CODIModel:
    return CODIModel.from_base(model_args, TrainingObjective.from_args(training_args))


def build_datasets(
    model: CODIModel, data_args: CODIDataArguments, training_args: CODITrainingArguments
) -> tuple[CODIDataset, DataStats, CODIDataset | None, DataStats | None]:
    source = data_args.train_file or data_args.data_name
    if source is None:
        raise ValueError("no training data: pass --train_file PATH or --data_name HUB_ID")
    common = dict(
        bot_id=model.bot_id,
        eot_id=model.eot_id,
        method=training_args.method,
        cot_style=data_args.cot_style,
        include_last_cot=data_args.include_last_cot,
        max_token_num=data_args.max_token_num,
        skip_negative_answers=data_args.skip_negative_answers,
        answer_prompt=model.args.answer_prompt,
        step_targets=training_args.latent_step_loss_factor > 0,
        position_limit=max_positions(model.hf_model),
        num_latent=model.args.num_latent,
    )
    records = load_records(source, "train")
    train_set, train_stats = build_dataset(
        records,
        model.tokenizer,
        max_samples=data_args.max_train_samples,
        name="train",
        **common,
    )
    train_stats.fingerprint = records_fingerprint(source, records[: train_stats.read])
    eval_source = data_args.validation_file or (data_args.data_name if data_args.validation_split else None)
    if eval_source is None:
        return train_set, train_stats, None, None
    eval_set, eval_stats = build_dataset(
        load_records(eval_source, data_args.validation_split or "validation"),
        model.tokenizer,
        max_samples=data_args.max_eval_samples,
        name="validation",
        **common,
    )
    return train_set, train_stats, eval_set, eval_stats


def _resume_path(training_args: CODITrainingArguments) -> str | None:
    value = training_args.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "no"):
        return None
    if str(value).lower() in ("true", "last", "latest"):
        last = last_complete_checkpoint(training_args.output_dir)
        if last is None:
            raise FileNotFoundError(
                f"--resume_from_checkpoint {value}: no checkpoint-* to resume in {training_args.output_dir} (none complete)"
            )
        return last
    if not os.path.isdir(value):
        raise FileNotFoundError(f"--resume_from_checkpoint: no such directory {value}")
    problem = checkpoint_problem(value)
    if problem:
        raise ValueError(f"--resume_from_checkpoint {value}: incomplete checkpoint ({problem})")
    return value


class TrainingInterrupted(RuntimeError):
    """Ctrl-C during training; the message says which checkpoint to resume from."""


def start_run(model_args, data_args, training_args, method_args=None) -> tuple[str | None, dict]:
    """What every training function does first: seed, the checkpoint to resume (checked against this
    run's arguments) and the output folder's rules (`codi.runs`). Returns (resume path, run signature)."""
    set_seed(training_args.seed)
    check_max_steps(training_args.max_steps)
    refuse_foreign_checkpoints(training_args.output_dir)
    if training_args.process_index == 0:  # one lock per run, not per process of a launcher
        acquire_run_lock(training_args.output_dir)
    try:
        resume = _resume_path(training_args)
        prepare_output_dir(
            training_args.output_dir,
            resume is not None,
            training_args.overwrite_output_dir,
            deletes=training_args.process_index == 0,
        )
        signature = run_signature(model_args, data_args, training_args, method_args)
        if resume is not None:
            check_resume_compatible(resume, signature)
            refuse_finished_run(resume)
    except BaseException:
        release_run_lock(training_args.output_dir)
        raise
    return resume, signature


def fit_and_save(trainer: Trainer, resume: str | None, train_stats: DataStats, extra_metrics=dict) -> dict:
    """What every training function does last: train (Ctrl-C names the checkpoint to resume from), the
    final validation, the final model, metrics (`all_results.json`, with the data counts and what
    `extra_metrics()` returns after training) and state."""
    output_dir = trainer.args.output_dir
    try:
        check_training_data(trainer, resume, train_stats.fingerprint)
        output = trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        release_run_lock(output_dir)
        last = last_complete_checkpoint(output_dir)
        where = f"the last complete checkpoint is {last}" if last else "no checkpoint was saved yet"
        raise TrainingInterrupted(
            f"interrupted at step {trainer.state.global_step}; {where}: rerun with "
            "--resume_from_checkpoint last to continue"
        ) from None
    except BaseException:
        release_run_lock(output_dir)
        raise
    metrics = dict(output.metrics)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model(output_dir)
    if trainer.is_world_process_zero():
        counts = {"train_records_kept": train_stats.kept, "train_records_dropped": dict(train_stats.dropped)}
        trainer.save_metrics("all", {**metrics, **counts, **extra_metrics()})
        trainer.save_state()
    release_run_lock(output_dir)
    logger.info("trained %d optimiser steps; model saved to %s", trainer.state.global_step, output_dir)
    return metrics


def train(
    model_args: CODIModelArguments, data_args: CODIDataArguments, training_args: CODITrainingArguments
) -> TrainResult:
    """Train CODI (or a CoT-SFT / No-CoT-SFT baseline), then save the final model to `output_dir`."""
    resume, signature = start_run(model_args, data_args, training_args)
    model = build_model(model_args, training_args)
    train_set, train_stats, eval_set, eval_stats = build_datasets(model, data_args, training_args)
    if eval_set is None and training_args.eval_strategy != "no":
        raise ValueError("eval_strategy is set but there is no validation data (--validation_file)")
    if training_args.label_names is None:
        training_args.label_names = ["teacher_labels"]
    training_args.prediction_loss_only = True
    trainer = CODITrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=CODICollator(model.pad_id),
        run_signature=signature,
    )
    metrics = fit_and_save(trainer, resume, train_stats)
    return TrainResult(model, trainer, train_stats, eval_stats, metrics)

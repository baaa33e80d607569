"""Training: setup -> fit -> validate -> save, on the HF Trainer (so DDP/FSDP/DeepSpeed work unchanged).

    trainer = CODITrainer(model="gpt2", args=CODIConfig(output_dir="runs/x"), train_dataset=dataset)
    trainer.train(); trainer.save_model()      # a datasets.Dataset with question / cot / answer columns

`CODITrainer.run(config)` is what `codi train` does: the run folder's rules before any model loads,
training, the final validation, the model, metrics and state saved. `train(model_args, data_args,
training_args)` is the same with the settings as three objects.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers import Trainer, set_seed

from . import trainer_inputs
from .config import CODIDataArguments, CODIModelArguments, CODITrainingArguments, resolve_defaults
from .data.dataset import CODICollator, CODIDataset, DataStats
from .io.checkpoint import write_json_atomically
from .io.hub import TrainerPushMixin
from .losses import TrainingObjective
from .model import CODIModel
from .run_safety import (
    SafeCheckpoints,
    acquire_run_lock,
    check_training_data,
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
from .trainer_inputs import CODIConfig

logger = logging.getLogger(__name__)
COMPONENTS = ("student_ce", "teacher_ce", "distill_loss", "latent_step_ce")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; raised with the step so the run can be resumed or fixed."""


class CODITrainer(SafeCheckpoints, TrainerPushMixin, Trainer):
    """HF Trainer that logs every loss component and saves/loads (and pushes) CODI checkpoints.

    With a `CODIConfig` as `args` it builds what is not given, TRL-style: `model` may be a hub id or a
    folder (default: the config's `model_name_or_path`) or a built model; `train_dataset` /
    `eval_dataset` a `datasets.Dataset` (or list of dicts) with question / cot / answer columns, or None
    for the config's `train_file` / `data_name` (and `validation_file`); the collator follows the model.
    """

    config_class = CODIConfig

    def __init__(
        self,
        model=None,
        args: CODITrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        *,
        run_signature: dict | None = None,
        **kwargs,
    ):
        self.config = args if isinstance(args, CODIConfig) else None
        if self.config is not None and not isinstance(args, self.config_class):
            raise TypeError(
                f"{type(self).__name__}: args must be a {self.config_class.__name__}, got {type(args).__name__}"
            )
        self.train_stats: DataStats | None = None
        self.eval_stats: DataStats | None = None
        if self.config is not None:
            set_seed(self.config.seed)  # the weights a model builds (projection, new rows) are seeded
            model = self.build_model(model)
            train_dataset, eval_dataset = self.build_datasets(model, train_dataset, eval_dataset)
            if eval_dataset is None and self.config.eval_strategy != "no":
                raise ValueError("eval_strategy is set but there is no validation data (--validation_file)")
            data_collator = data_collator or self.collator(model)
            kwargs["callbacks"] = [*self.method_callbacks(), *(kwargs.get("callbacks") or ())]
            self.prepare_args(self.config)
        if getattr(args, "learning_rate", 0) is None and isinstance(model, CODIModel):
            resolve_defaults(model.args, args)  # plain training arguments come through no config path
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            **kwargs,
        )
        self.run_signature = run_signature  # written into every checkpoint (see codi.runs)
        self._sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._counts = {"train": 0, "eval": 0}

    # ----------------------------------------------------------------------------------------------
    # What a method builds from its config (CoconutTrainer and ICoTTrainer override these)

    def build_model(self, model):
        model_args = trainer_inputs.model_arguments(model, self.config)
        if model_args is None:
            trainer_inputs.check_model(model, CODIModel, type(self).__name__)
            return model
        return CODIModel.from_base(model_args, TrainingObjective.from_args(self.config))

    def build_datasets(self, model, train_dataset, eval_dataset):
        """(training set, validation set or None); the data counts go to `train_stats`/`eval_stats`."""
        if train_dataset is not None and not trainer_inputs.is_rows(train_dataset):
            return train_dataset, eval_dataset  # built already
        train_set, self.train_stats, eval_set, self.eval_stats = trainer_inputs.build_datasets(
            model, self.config.data_args(), self.config, *self.records(train_dataset, eval_dataset)
        )
        return train_set, eval_set

    def records(self, train_dataset, eval_dataset) -> tuple[list | None, list | None]:
        """The records of datasets given as rows (None: read from the config's files)."""
        method = self.config.method
        return tuple(
            None if rows is None else trainer_inputs.dataset_records(rows, name, method)
            for rows, name in ((train_dataset, "train_dataset"), (eval_dataset, "eval_dataset"))
        )

    def collator(self, model):
        return CODICollator(model.pad_id)

    def method_callbacks(self) -> list:
        """Callbacks of the method (its schedule), run before those given to the constructor."""
        return []

    @staticmethod
    def prepare_args(args) -> None:
        if args.label_names is None:
            args.label_names = ["teacher_labels"]
        args.prediction_loss_only = True

    def extra_metrics(self) -> dict:
        """What `all_results.json` records besides the Trainer's metrics and the data counts."""
        return {}

    def result(self, metrics: dict) -> TrainResult:
        return TrainResult(self.model, self, self.train_stats, self.eval_stats, metrics)

    def evaluate_accuracy(self, dataset, mode: str | None = None, **decoding) -> dict:
        """Answer the questions of `dataset` (rows with question and answer columns) and score them as
        `codi eval` does; returns its summary (`accuracy` in %, speed). `mode`: latent, or cot for the
        baselines by default; `decoding`: `DecodingConfig` fields (`max_new_tokens=`, `batch_size=`)."""
        from .inference.evaluate import evaluate

        model = self.accelerator.unwrap_model(self.model)
        method = self.config.method if self.config is not None else model.objective.method
        mode = mode or ("cot" if method in ("cot_sft", "no_cot_sft", "icot") else "latent")
        was_training = model.training
        try:
            return evaluate(model.eval(), trainer_inputs.eval_items(dataset), mode, name="eval", **decoding)
        finally:
            model.train(was_training)

    # ----------------------------------------------------------------------------------------------
    # Running

    @classmethod
    def run(cls, config: CODIConfig, **kwargs) -> TrainResult:
        """What `codi train` does: the run folder's rules (checked before any model loads), the trainer,
        training, the final validation, the model saved to `output_dir` with metrics and state."""
        resume, signature = start_run(config.model_args(), config.data_args(), config, config.method_args())
        try:
            trainer = cls(args=config, run_signature=signature, **kwargs)
            return trainer.result(fit_and_save(trainer, resume, trainer.train_stats, trainer.extra_metrics))
        finally:  # a model or data that fails to load must not keep the folder locked in this process
            release_run_lock(config.output_dir)

    def train(self, resume_from_checkpoint=None, **kwargs):
        """HF `train`; built from a config (and not by `run`), the run folder's rules apply first: the
        checkpoint to resume (`"last"` works) is checked against this run's settings (`codi.runs`)."""
        if self.config is not None and self.run_signature is None:
            if resume_from_checkpoint is not None:
                self.config.resume_from_checkpoint = resume_from_checkpoint
            config = self.config
            resume_from_checkpoint, self.run_signature = start_run(
                config.model_args(), config.data_args(), config, config.method_args()
            )
        # every way into training records the data it reads, and refuses a resume onto other data
        fingerprint = self.train_stats.fingerprint if self.train_stats is not None else None
        check_training_data(
            self, resume_from_checkpoint if isinstance(resume_from_checkpoint, str) else None, fingerprint
        )
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

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
    resolve_defaults(model_args, training_args)  # Python callers skip parse_args, which does it too
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
        counts = {}
        if train_stats is not None:  # None: a dataset built by the caller
            counts = {
                "train_records_kept": train_stats.kept,
                "train_records_dropped": dict(train_stats.dropped),
            }
        trainer.save_metrics("all", {**metrics, **counts, **extra_metrics()})
        trainer.save_state()
    release_run_lock(output_dir)
    logger.info("trained %d optimiser steps; model saved to %s", trainer.state.global_step, output_dir)
    return metrics


def train(
    model_args: CODIModelArguments, data_args: CODIDataArguments, training_args: CODITrainingArguments
) -> TrainResult:
    """Train CODI (or a CoT-SFT / No-CoT-SFT baseline), then save the final model to `output_dir`
    (`CODITrainer.run` with the three objects as one `CODIConfig`)."""
    return CODITrainer.run(CODIConfig.from_parts(model_args, data_args, training_args))

"""A training run's output folder: complete checkpoints, what a resumed run must share, what may be replaced.

- Checkpoints are staged in `<output_dir>/.staging/` and renamed into place once every file is written,
  so a `checkpoint-N` folder is complete or absent; folders left incomplete by older versions or by
  hand are skipped by `--resume_from_checkpoint last`, with a warning naming them.
- Each checkpoint records the arguments that define the run (`codi_run.json`); resuming with different
  ones is refused, naming the fields (a resumed optimizer and schedule belong to the run that wrote them).
- A folder that holds an earlier run's outputs is refused unless the run resumes or `overwrite_output_dir`
  is set; overwriting deletes only the earlier run's `checkpoint-*` folders.
- Only what a run wrote is ever replaced or deleted: a checkpoint is ours when it holds both
  `trainer_state.json` and `codi_run.json`. A `checkpoint-*` folder that is not (the user's own, another
  tool's) makes the run refuse up front; rotation (`save_total_limit`) deletes only ours.
- A finished run (its last checkpoint at `max_steps`) resumed is refused: the Trainer would train one
  step past the end and write another checkpoint every time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import zipfile
from dataclasses import asdict

logger = logging.getLogger(__name__)

RUN_FILE = "codi_run.json"
TRAINING_DATA_KEY = "training_data"  # the run record's fingerprint of the records read for training
STAGING_DIR = ".staging"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
OWNED_MARKERS = ("trainer_state.json", RUN_FILE)  # both in every checkpoint a codi run writes
# Files an earlier run leaves in its output folder.
_RUN_OUTPUTS = ("codi_config.json", "trainer_state.json", "all_results.json", RUN_FILE)
# Arguments that do not change what a run computes (logging, saving, evaluation, loading options).
_MODEL_FIELDS_IGNORED = {
    "inf_latent_iterations",
    "trust_remote_code",
    "attn_implementation",
    "fused_lora",
    "layer_stack",
    "compile_layers",
}
_DATA_FIELDS = (
    "data_name", "train_file", "cot_style", "include_last_cot", "max_token_num", "skip_negative_answers",
    "max_train_samples",
)  # fmt: skip
_TRAINING_FIELDS = (
    "method", "distill_loss_type", "distill_loss_factor", "distill_loss_div_std", "ref_loss_factor",
    "latent_step_loss_factor", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
    "per_device_train_batch_size", "gradient_accumulation_steps", "world_size", "seed", "data_seed",
    "max_steps", "num_train_epochs", "max_grad_norm", "optim", "adam_beta1", "adam_beta2", "adam_epsilon",
    "bf16", "fp16", "train_sampling_strategy",
)  # fmt: skip


def run_signature(model_args, data_args, training_args, method_args=None) -> dict:
    """The arguments that define a run: a checkpoint resumes only a run with the same ones.
    `method_args`: a method's own settings (e.g. `CoconutArguments`), all of which count."""
    model = {k: v for k, v in asdict(model_args).items() if k not in _MODEL_FIELDS_IGNORED}
    data = {name: getattr(data_args, name) for name in _DATA_FIELDS}
    training = {name: _plain(getattr(training_args, name, None)) for name in _TRAINING_FIELDS}
    signature = {"model": model, "data": data, "training": training}
    if method_args is not None:
        signature["method"] = asdict(method_args)
    return json.loads(json.dumps(signature, default=str))


def _plain(value):
    return getattr(value, "value", value)  # enums (lr_scheduler_type, optim) as their string


def signature_differences(saved: dict, current: dict) -> list[str]:
    """`group.field: saved -> current` for every field that differs."""
    differences = []
    for group in sorted(set(saved) | set(current)):
        old, new = saved.get(group, {}), current.get(group, {})
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                differences.append(f"{name}: {old.get(name)!r} -> {new.get(name)!r}")
    return differences


def check_resume_compatible(checkpoint: str, signature: dict) -> None:
    path = os.path.join(checkpoint, RUN_FILE)
    if not os.path.isfile(path):
        logger.warning(
            "%s: no %s (written by an older version): arguments not compared", checkpoint, RUN_FILE
        )
        return
    with open(path) as handle:
        saved = json.load(handle)
    saved.pop(TRAINING_DATA_KEY, None)  # compared once the data are read (codi.run_safety)
    if not saved:  # a checkpoint of a trainer given no run signature
        logger.warning("%s: %s records no arguments: not compared", checkpoint, RUN_FILE)
        return
    differences = signature_differences(saved, signature)
    if differences:
        raise ValueError(
            f"cannot resume {checkpoint}: it belongs to a run with other arguments ({'; '.join(differences)}). "
            "Use the same arguments, or a new --output_dir (or --overwrite_output_dir) for a new run"
        )


def checkpoint_problem(path: str) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is."""
    state = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state):
        return "no trainer_state.json"
    try:
        with open(state) as handle:
            json.load(handle)
    except (OSError, json.JSONDecodeError):
        return "unreadable trainer_state.json"
    optimizer = os.path.join(path, "optimizer.pt")
    if os.path.exists(optimizer) and not zipfile.is_zipfile(optimizer):
        return "truncated optimizer.pt"
    has_weights = any(
        os.path.isfile(os.path.join(path, name))
        for name in ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
    )
    sharded = any(name.startswith(("pytorch_model_fsdp", "global_step")) for name in os.listdir(path))
    if not has_weights and not sharded:
        return "no model weights"
    return None


def checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-N` folders of `output_dir`, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m[1]), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint; incomplete newer ones are skipped with a warning naming them."""
    for path in reversed(checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping incomplete checkpoint %s (%s)", path, problem)
    return None


def is_ours(path: str) -> bool:
    """Whether a `checkpoint-*` folder was written by a codi run (see the module): only those are replaced
    or deleted."""
    return all(os.path.isfile(os.path.join(path, name)) for name in OWNED_MARKERS)


def foreign_checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-*` folders of `output_dir` that a codi run did not write and that hold something. The
    Trainer's own clean-up matches every `checkpoint-*` name, so these are refused before it runs; an
    empty folder (an interrupted save of an older version) holds nothing to lose."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name.startswith("checkpoint-") and os.path.isdir(path) and os.listdir(path) and not is_ours(path):
            found.append(path)
    return found


def refuse_foreign_checkpoints(output_dir: str) -> None:
    foreign = foreign_checkpoints(output_dir)
    if foreign:
        raise FileExistsError(
            f"--output_dir {output_dir} holds {', '.join(os.path.basename(p) for p in foreign[:3])}, not written "
            f"by a codi run (no {' + '.join(OWNED_MARKERS)}): a run there could replace or rotate it away. "
            "Move it out, or pick another --output_dir"
        )


def rotate_own_checkpoints(output_dir: str, save_total_limit: int | None, keep: str | None = None) -> None:
    """`save_total_limit`: delete the oldest of this run's checkpoints (never the newest, nor `keep`, the
    best one); folders not written by a codi run are never deleted."""
    if not save_total_limit or save_total_limit <= 0:
        return
    ours = [path for path in checkpoints(output_dir) if is_ours(path)]
    protected = {ours[-1]} if ours else set()
    if keep:
        protected.add(os.path.join(output_dir, os.path.basename(os.path.normpath(keep))))
    excess = len(ours) - max(save_total_limit, len(protected))
    for path in ours:
        if excess <= 0:
            break
        if path not in protected:
            logger.info("save_total_limit %d: deleting %s", save_total_limit, path)
            shutil.rmtree(path)
            excess -= 1


def refuse_finished_run(checkpoint: str) -> None:
    """A checkpoint at its run's last step resumes nothing: refuse (the Trainer would train one more
    step and write `checkpoint-<N+1>` on every such resume)."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json")) as handle:
            state = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return
    step, last = state.get("global_step", 0), state.get("max_steps", 0)
    if last and step >= last:
        raise ValueError(
            f"--resume_from_checkpoint: {checkpoint} is the end of a finished run (step {step} of {last}): "
            "nothing to resume. Its model is in that folder (and in --output_dir if the run saved it); "
            "train further as a new run with another --output_dir"
        )


def check_max_steps(max_steps: int) -> None:
    """`max_steps` 0 (or below -1) is refused: the Trainer would silently train by epochs instead."""
    if max_steps == 0 or max_steps < -1:
        raise ValueError(
            f"--max_steps {max_steps}: must be a positive number of optimiser steps, or -1 (the default) to "
            "train for --num_train_epochs"
        )


def prepare_output_dir(output_dir: str, resuming: bool, overwrite: bool, deletes: bool = True) -> None:
    """Refuse to train into an earlier run's folder unless resuming or overwriting (see the module).
    `deletes`: this process removes the earlier checkpoints (the main process only, under a launcher)."""
    if resuming or not os.path.isdir(output_dir):
        return
    earlier = [name for name in _RUN_OUTPUTS if os.path.exists(os.path.join(output_dir, name))]
    earlier += [os.path.basename(path) for path in checkpoints(output_dir)]
    if not earlier:
        return
    if not overwrite:
        raise FileExistsError(
            f"--output_dir {output_dir} holds an earlier run ({', '.join(sorted(earlier)[:4])}): pass "
            "--resume_from_checkpoint last to continue it, --overwrite_output_dir to replace it, or a new folder"
        )
    for path in checkpoints(output_dir) if deletes else []:
        if is_ours(path):
            logger.warning("--overwrite_output_dir: deleting the earlier run's %s", path)
            shutil.rmtree(path)

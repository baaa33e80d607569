"""What keeps a training run from losing or mixing up files: the folder lock, the training data's
fingerprint, and the Trainer's checkpoint saving and loading (`SafeCheckpoints`, a mixin of `CODITrainer`).

- `<output_dir>/.codi.lock` (pid, host, start time) refuses a second run into the same folder while the
  first is alive. A lock whose process is dead, or that was taken on another host (whose processes
  cannot be checked from here), is taken over with a warning. Under a launcher only the main process
  takes it.
- The run record (`codi_run.json`) holds a fingerprint of the training records read (how many, and a
  SHA-256 of their text): resuming on data edited since, at the same path, is refused, naming the source.
- A checkpoint is written into `.staging/` and renamed into place when complete (see `codi.runs`); a save
  that fails (disk full, file-size limit) removes what it staged and is one line naming the path and the
  free space. Only checkpoints a codi run wrote are replaced or rotated away.
- Resuming unpickles the optimizer, scheduler, scaler and RNG files with `weights_only=True`; a file
  that holds other objects is refused in one line naming it.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import socket
import time
from contextlib import contextmanager

from .io.checkpoint import CheckpointError, write_json_atomically
from .runs import (
    RUN_FILE,
    STAGING_DIR,
    TRAINING_DATA_KEY,
    is_ours,
    last_complete_checkpoint,
    rotate_own_checkpoints,
)

logger = logging.getLogger(__name__)

LOCK_FILE = ".codi.lock"
_HELD: set[str] = set()  # locks whose release at exit is registered
_DISK_FAULT = re.compile(r"No space left|File too large|Disk quota|os error (28|27|122)|fail\w* writ", re.I)


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (disk full, file-size limit); the message names path and space."""


# --------------------------------------------------------------------------------------------------
# The output folder's lock


def _lock_owner(path: str) -> dict:
    try:
        with open(path) as handle:
            owner = json.load(handle)
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def acquire_run_lock(output_dir: str) -> str:
    """Take `<output_dir>/.codi.lock`, or refuse while another live run holds it (see the module)."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    temporary = f"{path}.{me['pid']}"
    with open(temporary, "w") as handle:
        json.dump(me, handle)
    try:
        os.link(temporary, path)  # atomic: fails when a lock exists, never leaves a half-written one
    except FileExistsError:
        owner = _lock_owner(path)
        pid, host = owner.get("pid"), owner.get("host")
        if host == me["host"] and isinstance(pid, int) and pid != me["pid"] and _alive(pid):
            os.remove(temporary)
            raise FileExistsError(
                f"--output_dir {output_dir} is in use by another codi run (pid {pid}, started {owner.get('started')}; "
                f"lock {path}): wait for it to finish, or pick another --output_dir"
            ) from None
        if pid != me["pid"] or host != me["host"]:
            why = f"on another host, {host}" if host and host != me["host"] else "its process is gone"
            logger.warning("%s: taking over the lock of pid %s (%s)", path, pid, why)
        os.replace(temporary, path)
    else:
        os.remove(temporary)
    if path not in _HELD:  # a process killed without exiting leaves a stale lock, taken over next time
        _HELD.add(path)
        atexit.register(release_run_lock, output_dir)
    return path


def release_run_lock(output_dir: str) -> None:
    """Remove the lock if this process holds it."""
    path = os.path.join(output_dir, LOCK_FILE)
    owner = _lock_owner(path)
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------------------------
# The training data's fingerprint


def records_fingerprint(source: str, records) -> dict:
    """How many records were read from `source`, and a SHA-256 of their question, CoT and answer."""
    digest = hashlib.sha256()
    for record in records:
        for text in (record.question, record.cot, record.answer):
            value = str(text).encode("utf-8", "surrogatepass")
            digest.update(len(value).to_bytes(8, "little") + value)
    return {"source": str(source), "records": len(records), "sha256": digest.hexdigest()}


def check_training_data(trainer, resume: str | None, fingerprint: dict | None) -> None:
    """Record the fingerprint in every checkpoint's run record; refuse to resume a checkpoint whose run
    read other records."""
    if fingerprint is None:
        return
    if trainer.run_signature is not None:
        trainer.run_signature[TRAINING_DATA_KEY] = fingerprint
    if resume is None:
        return
    try:
        with open(os.path.join(resume, RUN_FILE)) as handle:
            saved = json.load(handle).get(TRAINING_DATA_KEY)
    except (OSError, ValueError, AttributeError):
        saved = None
    if not saved:
        logger.warning("%s: no fingerprint of its training data (older version): not compared", resume)
        return
    if (saved.get("records"), saved.get("sha256")) != (fingerprint["records"], fingerprint["sha256"]):
        raise ValueError(
            f"cannot resume {resume}: the training data {fingerprint['source']} differ from the records it was "
            f"trained on ({saved.get('records')} records, sha256 {str(saved.get('sha256'))[:12]} then; "
            f"{fingerprint['records']} records, sha256 {fingerprint['sha256'][:12]} now). Resume on the same "
            "data, or start a new run in another --output_dir"
        )


# --------------------------------------------------------------------------------------------------
# The Trainer's checkpoints


def _free_space(path: str) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.2f} GiB free there"
    except OSError:
        return "free space unknown"


def _remove_staged(staging: str, name: str) -> None:
    shutil.rmtree(os.path.join(staging, name), ignore_errors=True)
    try:
        os.rmdir(staging)  # only when empty: nothing else is ours to delete
    except OSError:
        pass


def _save_failure(error: BaseException, final: str, run_dir: str) -> CheckpointSaveError | None:
    """One line for a save that failed at the disk (None for any other error, re-raised as it is)."""
    if not isinstance(error, OSError) and not _DISK_FAULT.search(str(error)):
        return None
    reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
    last = last_complete_checkpoint(run_dir)
    kept = f"the last complete checkpoint is {last}" if last else "no complete checkpoint was saved yet"
    return CheckpointSaveError(
        f"could not save {final}: {reason} ({_free_space(run_dir)}); nothing of it was kept, {kept}"
    )


@contextmanager
def _safe_unpickling(checkpoint: str | None, names: tuple[str, ...]):
    """torch's refusal of a pickled object suggests `weights_only=False`: name the file in one line."""
    try:
        yield
    except pickle.UnpicklingError as error:
        from .io.reference_weights import _refusal_detail

        detail = _refusal_detail(str(error))
        raise CheckpointError(
            f"{_refused_file(checkpoint, names)}: holds objects other than tensors ({detail}), unsafe to "
            "unpickle: not loaded. Resume from another checkpoint, or start the run again"
        ) from None


def _refused_file(checkpoint: str | None, names: tuple[str, ...]) -> str:
    """The first of `names` in `checkpoint` (a name ending in `*`: a prefix) that the Trainer's safe
    unpickler refuses."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    if not checkpoint or not os.path.isdir(checkpoint):
        return str(checkpoint)
    for name in sorted(os.listdir(checkpoint)):
        if not any(name == n or (n.endswith("*") and name.startswith(n[:-1])) for n in names):
            continue
        try:
            with safe_globals():
                torch.load(os.path.join(checkpoint, name), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return os.path.join(checkpoint, name)
        except Exception:  # noqa: BLE001 - another fault; only the refused file is named here
            continue
    return checkpoint


class SafeCheckpoints:
    """Mixin of an HF `Trainer` (see the module): staged, owned checkpoints and safe resuming."""

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into `<run>/.staging/` and renamed into place when complete:
        an interrupted save (kill, full disk) leaves no `checkpoint-N` behind (see codi.runs)."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = self.args.output_dir
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = os.path.join(run_dir, STAGING_DIR), os.path.join(run_dir, name)
        # The Trainer writes the checkpoint into `args.output_dir`/checkpoint-N: point it at the staging
        # folder for the save (no hyperparameter search here, whose trials would nest run folders)
        self.args.output_dir = staging
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save and not os.path.isfile(os.path.join(staging, name, RUN_FILE)):
                # the ownership mark, also where `_save` wrote no model (ZeRO-3 without gathered weights)
                write_json_atomically(os.path.join(staging, name, RUN_FILE), self.run_signature or {})
        except Exception as error:
            if self.args.should_save:
                _remove_staged(staging, name)
            failure = _save_failure(error, final, run_dir)
            if failure is None:
                raise
            raise failure from None
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()  # every rank has written its files (RNG states, shards)
        if self.args.should_save:
            self._place_checkpoint(os.path.join(staging, name), final)
            rotate_own_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    def _place_checkpoint(self, staged: str, final: str) -> None:
        if os.path.isdir(final):
            if not is_ours(final):
                shutil.rmtree(staged, ignore_errors=True)
                raise FileExistsError(
                    f"{final} appeared during the run and was not written by it: not replaced"
                )
            shutil.rmtree(final)  # a checkpoint of this run at the same step: replaced whole
        os.replace(staged, final)
        try:
            os.rmdir(os.path.dirname(staged))
        except OSError:
            pass
        staging = os.path.dirname(staged)
        if (self.state.best_model_checkpoint or "").startswith(staging):
            self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(
                staging, os.path.dirname(final), 1
            )

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        with _safe_unpickling(checkpoint, ("optimizer.pt", "scheduler.pt")):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint) -> None:
        with _safe_unpickling(checkpoint, ("rng_state*",)):
            super()._load_rng_state(checkpoint)

    def _load_scaler(self, checkpoint) -> None:
        with _safe_unpickling(checkpoint, ("scaler.pt",)):
            super()._load_scaler(checkpoint)

"""Training runs never lose the user's files nor mix runs up (docs/reliability.md, "Runs: what is ours").

Each test here failed on the behaviour before these guards: user folders named `checkpoint-N` were
replaced or rotated away, `codi data synth` replaced `train.txt`, a finished run resumed trained one more
step, resuming on edited data and two runs in one folder went unnoticed, a full disk left `.staging`
and a bare OSError, and a pickled object in `optimizer.pt` drew torch's multi-line advice.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from test_train import quick_args
from transformers import TrainerCallback

from codi import cli
from codi.io.checkpoint import CheckpointError
from codi.run_safety import LOCK_FILE, CheckpointSaveError
from codi.runs import checkpoint_problem, is_ours, rotate_own_checkpoints
from codi.training import CODITrainer, train

SAVE_EVERY_2 = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]


def _user_folder(path, text="the user's own notes"):
    path.mkdir(parents=True)
    (path / "notes.txt").write_text(text)
    return path


def _with_callback(monkeypatch, callback):
    original = CODITrainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(callback)

    monkeypatch.setattr(CODITrainer, "__init__", init)


def test_a_users_checkpoint_folder_is_refused_up_front_and_never_replaced(tiny_gpt2, train_file, tmp_path):
    run = tmp_path / "run"
    mine = _user_folder(run / "checkpoint-2")
    with pytest.raises(FileExistsError, match=r"holds checkpoint-2, not written by a codi run") as error:
        train(*quick_args(tiny_gpt2, train_file, run, *SAVE_EVERY_2))
    assert "\n" not in str(error.value)
    overwrite = ["--overwrite_output_dir", "True"]  # replaces an earlier run of ours, never this folder
    with pytest.raises(FileExistsError, match=r"holds checkpoint-2, not written by a codi run"):
        train(*quick_args(tiny_gpt2, train_file, run, *SAVE_EVERY_2, *overwrite))
    assert (mine / "notes.txt").read_text() == "the user's own notes"
    assert not (run / LOCK_FILE).exists()  # a refused run leaves no lock behind


def test_rotation_deletes_only_this_runs_checkpoints(tiny_gpt2, train_file, tmp_path, monkeypatch):
    run = tmp_path / "run"

    class UserAddsAFolder(TrainerCallback):  # a folder put there while the run goes on
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                _user_folder(run / "checkpoint-1")

    _with_callback(monkeypatch, UserAddsAFolder())
    train(*quick_args(tiny_gpt2, train_file, run, *SAVE_EVERY_2, "--save_total_limit", "1"))
    assert (run / "checkpoint-1" / "notes.txt").read_text() == "the user's own notes"
    assert not (run / "checkpoint-2").exists() and is_ours(str(run / "checkpoint-4"))

    # the rule itself: the oldest of ours go, the newest and the best stay, others are not looked at
    for step in (1, 2, 3):
        (run / f"checkpoint-{step}0").mkdir()
        for name in ("trainer_state.json", "codi_run.json"):
            (run / f"checkpoint-{step}0" / name).write_text("{}")
    rotate_own_checkpoints(str(run), 2, keep=str(run / "checkpoint-10"))
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-1", "checkpoint-10", "checkpoint-30",
    ]  # fmt: skip


def test_synth_refuses_to_replace_the_users_files_without_overwrite(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("my data\n")
    argv = [
        "data",
        "synth",
        "--out",
        str(tmp_path),
        "--n_train",
        "20",
        "--n_validation",
        "5",
        "--n_test",
        "5",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "train.txt" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (tmp_path / "train.txt").read_text() == "my data\n"
    assert not (tmp_path / "test.txt").exists()  # nothing written
    assert cli.main([*argv, "--overwrite"]) == 0
    assert (tmp_path / "train.txt").read_text() != "my data\n"


def test_resuming_a_finished_run_is_refused_and_trains_no_extra_step(tiny_gpt2, train_file, tmp_path):
    common = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]
    train(*quick_args(tiny_gpt2, train_file, tmp_path / "run", *common))
    for _ in range(2):
        with pytest.raises(ValueError, match=r"checkpoint-2 is the end of a finished run \(step 2 of 2\)"):
            train(
                *quick_args(
                    tiny_gpt2, train_file, tmp_path / "run", *common, "--resume_from_checkpoint", "last"
                )
            )
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]


def test_resuming_on_edited_training_data_is_refused_naming_the_file(tiny_gpt2, train_file, tmp_path):
    run = tmp_path / "run"
    train(*quick_args(tiny_gpt2, train_file, run, *SAVE_EVERY_2))
    recorded = json.loads((run / "checkpoint-2" / "codi_run.json").read_text())["training_data"]
    assert recorded["records"] == 16 and len(recorded["sha256"]) == 64
    resume = ["--resume_from_checkpoint", str(run / "checkpoint-2")]
    lines = open(train_file).read().splitlines()
    lines[3] = lines[3].replace("####", "#### 1")  # one answer edited, same path, same record count
    open(train_file, "w").write("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"training data .*train\.txt differ from the records") as error:
        train(*quick_args(tiny_gpt2, train_file, run, *SAVE_EVERY_2, *resume))
    assert "\n" not in str(error.value)


def test_a_second_run_into_a_busy_folder_is_refused_and_stale_locks_are_taken_over(
    tiny_gpt2, train_file, tmp_path, caplog
):
    run = tmp_path / "run"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        owner = {"pid": other.pid, "host": socket.gethostname(), "started": "then"}
        (run / LOCK_FILE).write_text(json.dumps(owner))
        with pytest.raises(FileExistsError, match=rf"in use by another codi run \(pid {other.pid}"):
            train(*quick_args(tiny_gpt2, train_file, run, "--max_steps", "1"))
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == other.pid  # its lock is left alone
    finally:
        other.kill()
        other.wait()
    with caplog.at_level(logging.WARNING, logger="codi.run_safety"):
        train(*quick_args(tiny_gpt2, train_file, run, "--max_steps", "1"))  # the holder died: taken over
    assert f"taking over the lock of pid {other.pid} (its process is gone)" in caplog.text
    assert not (run / LOCK_FILE).exists()  # released at the end

    (run / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    with caplog.at_level(logging.WARNING, logger="codi.run_safety"):
        train(
            *quick_args(
                tiny_gpt2, train_file, tmp_path / "run", "--max_steps", "1", "--overwrite_output_dir", "True"
            )
        )
    assert "on another host, elsewhere" in caplog.text


def test_only_the_main_process_of_a_launcher_takes_the_lock(tiny_gpt2, train_file, tmp_path, monkeypatch):
    from codi import training

    taken = []
    monkeypatch.setattr(training, "acquire_run_lock", taken.append)
    args = quick_args(tiny_gpt2, train_file, tmp_path, "--max_steps", "1")
    monkeypatch.setattr(type(args[2]), "process_index", property(lambda self: 1))
    training.start_run(*args)
    assert taken == []


def test_max_steps_zero_is_a_one_line_error(tiny_gpt2, train_file, tmp_path):
    with pytest.raises(ValueError, match=r"--max_steps 0: must be a positive number"):
        train(*quick_args(tiny_gpt2, train_file, tmp_path, "--max_steps", "0"))
    assert not (tmp_path / "codi_config.json").exists()


def test_a_save_that_fails_at_the_disk_keeps_the_previous_checkpoint_and_cleans_staging(
    tiny_gpt2, train_file, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    _user_folder(run / "mine")
    original = torch.save

    def disk_full_at_step_4(obj, path, *args, **kwargs):
        if "checkpoint-4" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_4)
    with pytest.raises(CheckpointSaveError) as error:
        train(*quick_args(tiny_gpt2, train_file, run, *SAVE_EVERY_2))
    message = str(error.value)
    assert "\n" not in message and f"could not save {run / 'checkpoint-4'}: No space left" in message
    assert (
        "GiB free there" in message and f"the last complete checkpoint is {run / 'checkpoint-2'}" in message
    )
    assert not (run / ".staging").exists() and not (run / "checkpoint-4").exists()
    assert checkpoint_problem(str(run / "checkpoint-2")) is None
    assert (run / "mine" / "notes.txt").read_text() == "the user's own notes"
    assert not (run / LOCK_FILE).exists()  # a failed run releases its folder


_FSIZE_SCRIPT = """
import resource, signal, sys
from transformers import TrainerCallback
from test_train import quick_args
from codi.training import CODITrainer, train

class Limit(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:  # a file-size limit far below any checkpoint file
            resource.setrlimit(resource.RLIMIT_FSIZE, (2000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
original = CODITrainer.__init__
def init(self, *args, **kwargs):
    original(self, *args, **kwargs)
    self.add_callback(Limit())
CODITrainer.__init__ = init
try:
    train(*quick_args(sys.argv[1], sys.argv[2], sys.argv[3], *sys.argv[4:]))
except OSError as error:
    print("ERROR", error)
"""


def test_a_real_file_size_limit_during_a_save_is_one_line_and_leaves_no_staging(
    tiny_gpt2, train_file, tmp_path
):
    run = tmp_path / "run"
    script = tmp_path / "limit.py"
    script.write_text(textwrap.dedent(_FSIZE_SCRIPT))
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(script), tiny_gpt2, train_file, str(run), *SAVE_EVERY_2],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    errors = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, done.stdout + done.stderr
    assert f"could not save {run / 'checkpoint-4'}: File too large" in errors[0]
    assert not (run / ".staging").exists() and not (run / "checkpoint-4").exists()
    assert checkpoint_problem(str(run / "checkpoint-2")) is None


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth"])
def test_a_pickled_object_in_a_checkpoint_is_refused_in_one_line_naming_it(
    tiny_gpt2, train_file, tmp_path, name
):
    run = tmp_path / "run"
    train(*quick_args(tiny_gpt2, train_file, run, *SAVE_EVERY_2))
    torch.save({"state": argparse.Namespace(payload="anything")}, str(run / "checkpoint-2" / name))
    resume = ["--resume_from_checkpoint", str(run / "checkpoint-2")]
    with pytest.raises(CheckpointError) as error:
        train(*quick_args(tiny_gpt2, train_file, run, *SAVE_EVERY_2, *resume))
    message = str(error.value)
    assert message.startswith(f"{run / 'checkpoint-2' / name}: holds objects other than tensors")
    assert "\n" not in message and "weights_only" not in message


def test_the_cli_prints_these_refusals_in_one_line(tiny_gpt2, train_file, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model_name_or_path", tiny_gpt2, "--train_file", train_file, "--output_dir", str(run)]
    argv += ["--lora_r", "4", "--prj_dim", "8", "--num_latent", "2", "--per_device_train_batch_size", "2"]
    argv += ["--report_to", "none", "--disable_tqdm", "True", "--save_strategy", "steps", "--save_steps", "1"]
    assert cli.main([*argv, "--max_steps", "2"]) == 0
    capsys.readouterr()
    torch.save({"state": argparse.Namespace()}, str(run / "checkpoint-1" / "rng_state.pth"))
    for extra, expected in [
        (["--max_steps", "0"], "--max_steps 0: must be a positive number"),
        (["--max_steps", "2", "--resume_from_checkpoint", "last"], "is the end of a finished run"),
        (["--max_steps", "3", "--resume_from_checkpoint", "last"], "other arguments (max_steps: 2 -> 3)"),
        (["--max_steps", "2", "--resume_from_checkpoint", str(run / "checkpoint-1")], "rng_state.pth: holds"),
    ]:
        assert cli.main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        ours = [line for line in err.splitlines() if line.startswith("codi train")]
        assert len(ours) == 1 and ours[0].startswith("codi train: error: ") and expected in ours[0], err
        assert "Traceback" not in err and "weights_only" not in err

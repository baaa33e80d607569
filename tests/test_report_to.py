"""Training logs every loss component through the Trainer's `report_to` (TensorBoard event files)."""

from __future__ import annotations

import glob
import os

import pytest
from conftest import RECORDS

from codi.config import parse_args
from codi.training import train

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -e '.[tensorboard]')")


def _scalars(log_dir: str) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no TensorBoard event file under {log_dir}"
    values: dict[str, list[float]] = {}
    for path in files:
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            values.setdefault(tag, []).extend(event.value for event in accumulator.Scalars(tag))
    return values


def test_tensorboard_gets_every_loss_component(tiny_gpt2, tmp_path, monkeypatch):
    # The training arguments put --logging_dir into this variable (once per process): start clean.
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    train_file = tmp_path / "train.txt"
    train_file.write_text("".join(f"{r.question}||{r.cot} {r.answer}\n" for r in RECORDS) * 2)
    log_dir = tmp_path / "tb"
    argv = [
        "--model_name_or_path",
        tiny_gpt2,
        "--train_file",
        str(train_file),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    argv += ["--lora_r", "8", "--prj_dim", "16", "--num_latent", "2", "--per_device_train_batch_size", "2"]
    argv += ["--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "True"]
    argv += ["--report_to", "tensorboard", "--logging_dir", str(log_dir), "--latent_step_loss_factor", "0.5"]
    result = train(*parse_args(argv))
    scalars = _scalars(str(log_dir))
    for component in ("loss", "student_ce", "teacher_ce", "distill_loss", "latent_step_ce"):
        assert f"train/{component}" in scalars, sorted(scalars)
        assert len(scalars[f"train/{component}"]) == 2  # one point per optimiser step (logging_steps=1)
    logged = [entry["student_ce"] for entry in result.trainer.state.log_history if "student_ce" in entry]
    assert scalars["train/student_ce"] == pytest.approx(logged, abs=1e-4)

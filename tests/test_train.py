"""Training harness: presets through the CLI, resume, validation, baselines, NaN guard, checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import RECORDS, REPO_ROOT, batch_for, shared_file
from safetensors.torch import load_file

from codi.cli import main as cli_main
from codi.config import parse_args
from codi.model import CODIModel
from codi.testing import save_tiny_model
from codi.training import NonFiniteLossError, train

PRESETS = [
    "gpt2_gsm8k-aug",
    "gpt2_gsm8k-aug-nl",
    "llama1b_gsm8k-aug",
    "llama1b_gsm8k-aug-nl",
    "gpt2_commonsense",
]


@pytest.fixture(scope="module")
def gpt2_1024(tmp_path_factory) -> str:
    """Tiny GPT-2 with GPT-2's 1024 positions: the presets' max_token_num 1000 keeps long records."""
    return save_tiny_model(str(tmp_path_factory.mktemp("gpt2_1024")), arch="gpt2", max_positions=1024)


def quick_args(model_dir: str, train_file: str, output_dir: Path, *extra: str):
    return parse_args(
        [
            "--model_name_or_path",
            model_dir,
            "--train_file",
            train_file,
            "--output_dir",
            str(output_dir),
            "--lora_r",
            "8",
            "--prj_dim",
            "16",
            "--num_latent",
            "2",
            "--per_device_train_batch_size",
            "2",
            "--learning_rate",
            "1e-2",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--disable_tqdm",
            "True",
            "--seed",
            "7",
            *extra,
        ]
    )


def logged(trainer, key: str = "loss") -> dict[int, float]:
    return {entry["step"]: entry[key] for entry in trainer.state.log_history if key in entry}


# --------------------------------------------------------------------------------------------------
# Presets through the command line


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_on_a_tiny_model(preset, tiny_llama, gpt2_1024, train_file, tmp_path):
    """`codi train --config <preset>` with a tiny base: the preset's values (bf16 included) are kept;
    only the per-device batch is made small so that the suite stays fast on 2 CPU cores. Local data,
    so that this runs even without ../shared/data (the tests below use the shared file)."""
    model_dir = tiny_llama if preset.startswith("llama") else gpt2_1024
    config = REPO_ROOT / "configs" / f"{preset}.yaml"
    argv = ["--config", str(config), "--model_name_or_path", model_dir, "--train_file", train_file]
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path)]
    argv += ["--max_train_samples", "8", "--disable_tqdm", "True"]
    model_args, data_args, training_args = parse_args(argv)
    assert training_args.bf16 and model_args.num_latent == 6 and model_args.lora_r == 128
    assert training_args.gradient_accumulation_steps in (2, 4) and training_args.seed == 11
    assert cli_main(["train", *argv]) == 0
    metrics = json.loads((tmp_path / "all_results.json").read_text())
    assert metrics["train_records_kept"] == 8
    assert (tmp_path / "codi_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()


def test_cli_console_script_runs_a_preset(tiny_llama, tmp_path):
    """The documented command, in a fresh process, through the installed `codi` console script."""
    data = shared_file("gsm8k_aug_valid.txt")
    script = Path(sys.executable).parent / "codi"
    entry = [str(script)] if script.is_file() else [sys.executable, "-m", "codi.cli"]
    command = [*entry, "train", "--config", "configs/llama1b_gsm8k-aug.yaml"]
    command += ["--model_name_or_path", tiny_llama, "--train_file", str(data), "--max_steps", "3"]
    command += ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "1"]
    command += ["--output_dir", str(tmp_path), "--disable_tqdm", "True"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'train_loss'" in done.stdout
    assert "train: read 500 records, kept" in done.stderr  # drop counts are logged
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_preset_with_its_full_batch(gpt2_1024, tmp_path):
    """The issue's exact command: nothing overridden but the base model, data and steps (64 x 2, bf16,
    max_token_num 1000; about 15 s on one CPU thread)."""
    data = shared_file("gsm8k_aug_valid.txt")
    argv = ["train", "--config", str(REPO_ROOT / "configs" / "gpt2_gsm8k-aug.yaml")]
    argv += ["--model_name_or_path", gpt2_1024, "--train_file", str(data), "--max_steps", "3"]
    assert cli_main([*argv, "--output_dir", str(tmp_path)]) == 0


def test_bf16_can_be_overridden_off(tiny_llama, tmp_path):
    config = str(REPO_ROOT / "configs" / "llama1b_gsm8k-aug.yaml")
    _, _, training_args = parse_args(["--config", config, "--bf16", "False", "--output_dir", str(tmp_path)])
    assert training_args.bf16 is False
    assert training_args.use_cpu is False  # only bf16 without a GPU switches the Trainer to the CPU


def test_cli_reports_bad_arguments_without_a_traceback(capsys):
    assert cli_main(["train", "--num_latnt", "3"]) == 2
    assert "Did you mean: num_latent" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Resume, validation, baselines, NaN guard, final checkpoint


def test_resume_continues_to_the_same_loss(tiny_gpt2, train_file, tmp_path):
    common = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    full = train(*quick_args(tiny_gpt2, train_file, tmp_path / "full", *common))
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "codi_extra.safetensors").is_file()

    resumed = train(
        *quick_args(
            tiny_gpt2,
            train_file,
            tmp_path / "resumed",
            *common,
            "--resume_from_checkpoint",
            str(checkpoint),
        )
    )
    full_losses, resumed_losses = logged(full.trainer), logged(resumed.trainer)
    assert set(resumed_losses) == {1, 2, 3, 4}  # steps 1-2 come back from the checkpoint's state
    for step in (3, 4):
        assert resumed_losses[step] == pytest.approx(full_losses[step], rel=1e-5), step
    for name in ("adapter_model.safetensors", "codi_extra.safetensors"):
        a, b = load_file(tmp_path / "full" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.allclose(a[key], b[key], atol=1e-6), key
    assert float(full.metrics["train_loss"]) > 0


def test_resume_latest_without_checkpoint_is_a_clear_error(tiny_gpt2, train_file, tmp_path):
    args = quick_args(tiny_gpt2, train_file, tmp_path, "--max_steps", "1", "--resume_from_checkpoint", "last")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(*args)


def test_validation_loss_and_components_are_logged(tiny_gpt2, train_file, tmp_path):
    extra = ["--max_steps", "2", "--validation_file", train_file, "--max_eval_samples", "4"]
    extra += ["--eval_strategy", "steps", "--eval_steps", "1", "--per_device_eval_batch_size", "2"]
    result = train(*quick_args(tiny_gpt2, train_file, tmp_path, *extra))
    for key in ("eval_loss", "eval_student_ce", "eval_teacher_ce", "eval_distill_loss"):
        assert key in result.metrics, key
    assert result.eval_stats.kept == 4
    per_step = logged(result.trainer, "eval_loss")
    assert set(per_step) >= {1, 2}
    train_logs = [e for e in result.trainer.state.log_history if "loss" in e]
    assert all({"student_ce", "teacher_ce", "distill_loss"} <= set(e) for e in train_logs)


def test_hub_data_with_a_validation_split(tiny_gpt2, tmp_path, monkeypatch):
    """`--data_name` + `--validation_split` (whynlp/gsm8k-aug has one), offline via a fake loader."""
    import datasets

    splits = []

    def fake_load_dataset(name, split):
        splits.append((name, split))
        rows = [{"question": r.question, "cot": r.cot, "answer": r.answer} for r in RECORDS]
        return datasets.Dataset.from_list(rows * 2 if split == "train" else rows[:2])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    argv = ["--model_name_or_path", tiny_gpt2, "--data_name", "whynlp/gsm8k-aug", "--validation_split"]
    argv += ["validation", "--eval_strategy", "steps", "--eval_steps", "1", "--max_steps", "1"]
    argv += ["--output_dir", str(tmp_path), "--lora_r", "4", "--prj_dim", "8", "--num_latent", "1"]
    argv += ["--per_device_train_batch_size", "2", "--report_to", "none", "--disable_tqdm", "True"]
    result = train(*parse_args(argv))
    assert splits == [("whynlp/gsm8k-aug", "train"), ("whynlp/gsm8k-aug", "validation")]
    assert (result.train_stats.kept, result.eval_stats.kept) == (8, 2)
    assert "eval_loss" in result.metrics


def test_eval_strategy_without_validation_data_is_rejected(tiny_gpt2, train_file, tmp_path):
    args = quick_args(tiny_gpt2, train_file, tmp_path, "--max_steps", "1", "--eval_strategy", "steps")
    with pytest.raises(ValueError, match="no validation data"):
        train(*args)


@pytest.mark.parametrize("method", ["cot_sft", "no_cot_sft"])
def test_baselines_train_in_the_same_harness(method, tiny_gpt2, train_file, tmp_path):
    result = train(*quick_args(tiny_gpt2, train_file, tmp_path, "--max_steps", "2", "--method", method))
    logs = [e for e in result.trainer.state.log_history if "loss" in e]
    assert logs and all(e["student_ce"] == 0 and e["distill_loss"] == 0 for e in logs)
    assert all(e["teacher_ce"] > 0 for e in logs)
    example = result.trainer.train_dataset.examples[0]
    assert (example.cot_ids == []) == (method == "no_cot_sft")


def test_nan_loss_raises_a_clear_error(tiny_gpt2, train_file, tmp_path, monkeypatch):
    original = CODIModel.forward

    def nan_forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(CODIModel, "forward", nan_forward)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at global step 0: student_ce="):
        train(*quick_args(tiny_gpt2, train_file, tmp_path, "--max_steps", "2"))


def test_final_checkpoint_reloads_to_identical_outputs(tiny_llama, train_file, tmp_path):
    result = train(*quick_args(tiny_llama, train_file, tmp_path, "--max_steps", "2"))
    trained = result.model.eval()
    loaded = CODIModel.from_pretrained(str(tmp_path))
    loaded = loaded.with_settings(trained.objective)
    batch = batch_for(trained)
    with torch.no_grad():
        a, b = trained(**batch), loaded(**batch)
    for key in ("loss", "student_ce", "teacher_ce", "distill_loss"):
        assert torch.equal(a[key], b[key]), key
    saved = json.loads((tmp_path / "codi_config.json").read_text())
    assert saved["model_args"]["num_latent"] == 2 and saved["format"] == "codi"

"""Bad input and faults: each case ends in a clear error, a counted skip or a refusal (docs/reliability.md)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest
from conftest import RECORDS
from test_train import logged, quick_args
from transformers import TrainerCallback

from codi.config import CODIModelArguments
from codi.data.dataset import build_dataset
from codi.data.records import DataError, RawRecord
from codi.io.checkpoint import CheckpointError
from codi.model import CODIModel
from codi.testing import save_tiny_model
from codi.training import CODITrainer, TrainingInterrupted, train


def _build(model, records, **kwargs):
    return build_dataset(records, model.tokenizer, bot_id=model.bot_id, eot_id=model.eot_id, **kwargs)


def test_non_numeric_answers_are_kept_counted_and_logged(make_model, caplog):
    model = make_model("gpt2")
    records = [
        *RECORDS[:2],
        RawRecord("How many apples?", "<<3+4=7>>", "#### 7 apples", "f.txt:3"),
        RawRecord("How many?", "<<3+4=7>>", "#### seven", "f.txt:4"),
        RawRecord("Is it?", "<<1+0=1>>", "True", "f.jsonl:5"),
    ]
    with caplog.at_level(logging.WARNING, logger="codi.data.dataset"):
        dataset, stats = _build(model, records)
    assert stats.kept == 5 and len(dataset) == 5  # kept: right for non-math tasks
    assert stats.flagged["non_numeric_answer"] == 3  # "7 apples" -> its last token "apples"; "seven"; "True"
    assert "f.txt:3" in stats.first_flagged["non_numeric_answer"]
    assert "non_numeric_answer" in caplog.text and "f.txt:3" in caplog.text


def test_commonsense_letters_are_not_flagged(make_model):
    model = make_model("gpt2")
    records = [RawRecord("Which one? A) x B) y", "Because.", "B", "c.jsonl:1")]
    _, stats = _build(model, records, cot_style="commonsense")
    assert not stats.flagged


def test_records_longer_than_the_model_positions_are_dropped_and_counted(make_model):
    model = make_model("gpt2")
    long_question = " ".join(["Tom has 12 apples and buys 30 more."] * 12)
    records = [*RECORDS, RawRecord(long_question, "<<12+30=42>>", "#### 42", "long.txt:9")]
    fitting, _ = _build(model, RECORDS, num_latent=3)
    limit = max(len(e.student_input_ids) + 3 + len(e.decoder_input_ids) for e in fitting.examples)
    limit = max(limit, *(len(e.teacher_input_ids) for e in fitting.examples))
    dataset, stats = _build(model, records, position_limit=limit, num_latent=3)
    assert stats.dropped["longer_than_model_positions"] == 1
    assert stats.first_dropped["longer_than_model_positions"] == "long.txt:9"
    assert len(dataset) == len(RECORDS)
    # the student sequence counts its latents: with many latents it is the longer one
    example = dataset.examples[0]
    teacher = len(example.teacher_input_ids)
    student = len(example.student_input_ids) + 50 + len(example.decoder_input_ids)
    assert student > teacher
    _, stats = _build(model, RECORDS[:2], position_limit=student, num_latent=50)
    assert stats.kept >= 1
    with pytest.raises(DataError, match="no usable records.*longer_than_model_positions"):
        _build(model, RECORDS[:1], position_limit=student - 1, num_latent=50)


# --------------------------------------------------------------------------------------------------
# Checkpoints: trust, integrity, provenance


def _saved_lora_checkpoint(make_model, directory) -> str:
    model = make_model("gpt2")
    model.save_pretrained(str(directory))
    return str(directory)


def test_checkpoint_cannot_grant_itself_remote_code(make_model, tmp_path):
    path = _saved_lora_checkpoint(make_model, tmp_path / "ckpt")
    marker = tmp_path / "remote_code_ran"
    (tmp_path / "ckpt" / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    config_path = tmp_path / "ckpt" / "codi_config.json"
    config = json.loads(config_path.read_text())
    config["model_args"]["trust_remote_code"] = True
    config_path.write_text(json.dumps(config))
    tokenizer_config = tmp_path / "ckpt" / "tokenizer_config.json"
    values = json.loads(tokenizer_config.read_text())
    values["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    tokenizer_config.write_text(json.dumps(values))
    try:
        model = CODIModel.from_pretrained(path)
    except (ValueError, OSError) as error:  # refusing is fine too; running the file is not
        assert "\n" not in str(error).strip()
    else:
        assert model.args.trust_remote_code is False
    assert not marker.exists()


def test_saved_config_never_carries_code_execution_or_machine_options(make_model, tmp_path):
    model = make_model("gpt2", trust_remote_code=True, dtype="float32")
    model.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "codi_config.json").read_text())
    assert not {"trust_remote_code", "dtype", "attn_implementation"} & set(saved["model_args"])
    assert saved["objective"]["method"] == "codi" and saved["produced_by"]["codi"]


def test_lora_checkpoint_refuses_another_base_of_the_same_shape(make_model, tmp_path):
    path = _saved_lora_checkpoint(make_model, tmp_path / "ckpt")
    other = tmp_path / "other_base"
    save_tiny_model(str(other), arch="gpt2", seed=1)  # same shapes, other weights
    with pytest.raises(CheckpointError, match="not the one this LoRA checkpoint was trained on"):
        CODIModel.from_pretrained(path, base_model_name_or_path=str(other))
    loaded = CODIModel.from_pretrained(path, base_model_name_or_path=str(other), allow_base_mismatch=True)
    assert loaded.is_lora
    CODIModel.from_pretrained(path)  # the recorded base still matches


def test_checkpoint_records_the_training_method(make_model, tmp_path):
    make_model("gpt2", method="no_cot_sft").save_pretrained(str(tmp_path))
    assert CODIModel.from_pretrained(str(tmp_path)).objective.method == "no_cot_sft"


@pytest.mark.parametrize("damage", ["truncate_extra", "truncate_adapter", "corrupt_config", "empty_config"])
def test_damaged_checkpoint_files_are_one_line_errors(make_model, tmp_path, damage):
    path = _saved_lora_checkpoint(make_model, tmp_path)
    target = {
        "truncate_extra": "codi_extra.safetensors",
        "truncate_adapter": "adapter_model.safetensors",
        "corrupt_config": "codi_config.json",
        "empty_config": "codi_config.json",
    }[damage]
    data = (tmp_path / target).read_bytes()
    (tmp_path / target).write_bytes(b"" if damage == "empty_config" else data[: len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        CODIModel.from_pretrained(path)
    message = str(error.value)
    assert target in message and "\n" not in message


# --------------------------------------------------------------------------------------------------
# Training runs: output folders, interrupted saves, resuming


def test_training_into_an_earlier_runs_folder_is_refused_then_overwritten(tiny_gpt2, train_file, tmp_path):
    common = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "2"]
    train(*quick_args(tiny_gpt2, train_file, tmp_path, *common))
    assert (tmp_path / "checkpoint-2").is_dir()
    with pytest.raises(FileExistsError, match="holds an earlier run"):
        train(*quick_args(tiny_gpt2, train_file, tmp_path, "--max_steps", "1"))
    assert (tmp_path / "checkpoint-2").is_dir() and (tmp_path / "train.txt").is_file()  # nothing deleted
    train(*quick_args(tiny_gpt2, train_file, tmp_path, "--max_steps", "1", "--overwrite_output_dir", "True"))
    assert not (tmp_path / "checkpoint-2").exists()  # the earlier run's checkpoint is gone
    assert (tmp_path / "train.txt").is_file()  # what we did not write stays


def test_resume_with_other_arguments_is_refused_naming_them(tiny_gpt2, train_file, tmp_path):
    common = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"]
    train(*quick_args(tiny_gpt2, train_file, tmp_path, *common))
    with pytest.raises(ValueError, match=r"lora_r: 8 -> 4.*learning_rate") as error:
        train(*quick_args(tiny_gpt2, train_file, tmp_path, *common, "--resume_from_checkpoint", "last",
                          "--lora_r", "4", "--learning_rate", "0.5"))  # fmt: skip
    assert "\n" not in str(error.value)


def test_interrupted_save_leaves_no_checkpoint_and_resume_skips_partial_ones(
    tiny_gpt2, train_file, tmp_path, caplog
):
    common = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    full = train(*quick_args(tiny_gpt2, train_file, tmp_path / "full", *common))
    run = tmp_path / "run"

    # 1. a crash in the middle of writing checkpoint-2 (after the model, before the optimizer)
    original = CODITrainer._save_optimizer_and_scheduler

    def crash(self, output_dir):
        raise OSError("No space left on device")

    CODITrainer._save_optimizer_and_scheduler = crash
    try:
        with pytest.raises(OSError, match="No space left"):
            train(*quick_args(tiny_gpt2, train_file, run, *common))
    finally:
        CODITrainer._save_optimizer_and_scheduler = original
    assert not (run / "checkpoint-2").exists() and not (run / ".staging").exists()  # what it staged is gone

    # 2. the run again (it resumes nothing: no complete checkpoint), then a kill -9 during checkpoint-6's
    #    save and a truncated optimizer in checkpoint-4, as older versions could leave them
    train(*quick_args(tiny_gpt2, train_file, run, *common, "--overwrite_output_dir", "True"))
    (run / "checkpoint-6").mkdir()
    optimizer = run / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    for path in (run / "codi_config.json", run / "adapter_model.safetensors"):
        path.unlink()  # the final model of the killed run was never written
    with caplog.at_level(logging.WARNING, logger="codi.runs"):
        resumed = train(*quick_args(tiny_gpt2, train_file, run, *common, "--resume_from_checkpoint", "last"))
    assert "checkpoint-6" in caplog.text and "checkpoint-4" in caplog.text
    assert logged(resumed.trainer).keys() == {1, 2, 3, 4}
    for step in (3, 4):  # resumed from checkpoint-2: the same losses as the uninterrupted run
        assert logged(resumed.trainer)[step] == pytest.approx(logged(full.trainer)[step], rel=1e-5)


def test_ctrl_c_names_the_checkpoint_to_resume_from(tiny_gpt2, train_file, tmp_path):
    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    common = ["--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    original = CODITrainer.__init__

    def with_callback(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(Interrupt())

    CODITrainer.__init__ = with_callback
    try:
        with pytest.raises(
            TrainingInterrupted, match=r"step 3; the last complete checkpoint is .*checkpoint-2"
        ):
            train(*quick_args(tiny_gpt2, train_file, tmp_path, *common))
    finally:
        CODITrainer.__init__ = original


def test_demo_overwrite_refuses_a_folder_it_did_not_write(tmp_path):
    from codi.demo.pipeline import fresh_out_dir

    (tmp_path / "notes.txt").write_text("the user's own file")
    with pytest.raises(FileExistsError, match="not written by codi demo"):
        fresh_out_dir(str(tmp_path), overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"  # nothing deleted


def test_probe_skips_questions_longer_than_the_model(make_model, caplog):
    from codi.analysis.probe import probe

    model = make_model("gpt2")
    limit = model.hf_model.config.n_positions
    long_question = "Tom has 12 apples. " * (limit // 4)
    with caplog.at_level(logging.WARNING, logger="codi.analysis.probe"):
        records = probe(model, [long_question, RECORDS[0].question], predict=False)
    assert [record.question for record in records] == [RECORDS[0].question]
    assert records[0].index == 1  # the input's own index: the report's rows name the right record
    assert "1 question(s) skipped" in caplog.text
    with pytest.raises(DataError, match="item 0 has no question text"):
        probe(model, [{"answer": "#### 3"}], predict=False)


def test_moved_base_model_names_the_recorded_path_and_base_model_flag(make_model, tmp_path):
    base = tmp_path / "base"
    save_tiny_model(str(base), arch="gpt2")
    model = CODIModel.from_base(CODIModelArguments(model_name_or_path=str(base), lora_r=4, prj_dim=8))
    model.save_pretrained(str(tmp_path / "ckpt"))
    base.rename(tmp_path / "moved")
    with pytest.raises(OSError, match=r"cannot be loaded; if it moved, pass --base_model") as error:
        CODIModel.from_pretrained(str(tmp_path / "ckpt"))
    assert str(base) in str(error.value)
    CODIModel.from_pretrained(str(tmp_path / "ckpt"), base_model_name_or_path=str(tmp_path / "moved"))


def test_eval_mode_follows_the_recorded_method_and_warns_on_a_mismatch(make_model, caplog):
    from codi.cli.evaluate import _mode

    no_cot = make_model("gpt2", method="no_cot_sft")
    assert _mode(None, no_cot) == "cot" and _mode(None, make_model("gpt2")) == "latent"
    with caplog.at_level(logging.WARNING, logger="codi.cli.evaluate"):
        assert _mode("latent", no_cot) == "latent"
    assert "trained with method 'no_cot_sft'" in caplog.text


def test_cli_train_prints_where_the_model_went_and_nan_is_one_line(
    tiny_gpt2, train_file, tmp_path, capsys, monkeypatch
):
    from codi import cli

    argv = ["train", "--model_name_or_path", tiny_gpt2, "--train_file", train_file, "--lora_r", "4"]
    argv += ["--prj_dim", "8", "--num_latent", "2", "--per_device_train_batch_size", "2", "--max_steps", "1"]
    argv += ["--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "True"]
    assert cli.main([*argv, "--output_dir", str(tmp_path / "a")]) == 0
    assert f"model saved to {tmp_path / 'a'}" in capsys.readouterr().out

    original = CODIModel.forward

    def nan_forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(CODIModel, "forward", nan_forward)
    assert cli.main([*argv, "--output_dir", str(tmp_path / "b")]) == 1
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("codi train")]
    assert len(ours) == 1 and "non-finite loss at global step 0" in ours[0]  # one line, no traceback


def test_every_test_named_in_docs_reliability_exists():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    table = (root / "docs" / "reliability.md").read_text()
    named = re.findall(r"tests/(test_\w+\.py)::(test_\w+)", table)
    assert len(named) > 20
    missing = [
        f"{file}::{name}" for file, name in named if f"def {name}(" not in (root / "tests" / file).read_text()
    ]
    assert not missing, missing


def test_review_fixes_fail_early_in_one_line(tmp_path, capsys):
    from codi import cli
    from codi.cli.train import requested_method
    from codi.demo.presets import PRESETS

    preset = tmp_path / "icot.yaml"
    preset.write_text("method: icot\n")
    assert requested_method([f"--config={preset}"]) == "icot"  # both --config spellings
    assert requested_method(["--config", str(preset), "--method", "coconut"]) == "coconut"
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    assert cli.main(["train", "--config", str(bad)]) == 2
    assert "bad.yaml: invalid YAML" in capsys.readouterr().err
    assert cli.main(["probe", "--model", "m", "--data", "d", "--output_dir", "o", "--limit", "0"]) == 2
    assert "--limit must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="cot_warmup_steps"):  # before the demo makes its folder
        replace(PRESETS["default"], cot_warmup_steps=5000)

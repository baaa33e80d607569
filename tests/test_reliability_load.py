"""Loading refuses incomplete or inconsistent checkpoints; commands refuse inputs that yield nothing;
gold answers are read as plain finite decimals (docs/reliability.md, "Loading and scoring")."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from conftest import RECORDS
from safetensors.torch import load_file, save_file

from codi import cli
from codi.config import CODIModelArguments
from codi.io.checkpoint import CheckpointError
from codi.losses import TrainingObjective
from codi.model import CODIModel
from codi.testing import save_tiny_model


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def _edit_json(path, change) -> None:
    values = json.loads(path.read_text())
    change(values)
    path.write_text(json.dumps(values))


# --------------------------------------------------------------------------------------------------
# Missing and unexpected tensors


def test_a_full_checkpoint_with_a_lost_shard_is_refused_naming_the_tensors(make_model, tmp_path):
    make_model("gpt2", use_lora=False).save_pretrained(str(tmp_path))
    weights = load_file(str(tmp_path / "model.safetensors"))
    names = sorted(weights)
    kept = [name for name in names if ".h.1." not in name]  # the second block's shard is lost
    save_file({name: weights[name] for name in kept}, str(tmp_path / "model-00001-of-00002.safetensors"))
    (tmp_path / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": dict.fromkeys(kept, "model-00001-of-00002.safetensors")}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as error:
        CODIModel.from_pretrained(str(tmp_path))
    message = _one_line(error)
    assert "model.safetensors.index.json lacks" in message and "transformer.h.1.attn.c_attn.weight" in message
    assert "--allow_incomplete_weights" in message
    CODIModel.from_pretrained(str(tmp_path), allow_incomplete_weights=True)  # knowingly


def test_lora_and_extra_files_with_missing_or_unexpected_tensors_are_refused(make_model, tmp_path):
    make_model("gpt2").save_pretrained(str(tmp_path))
    adapter = tmp_path / "adapter_model.safetensors"
    weights = load_file(str(adapter))
    lost = next(name for name in sorted(weights) if "lora_B" in name)  # a zero B: silently the bare base
    save_file({name: value for name, value in weights.items() if name != lost}, str(adapter))
    with pytest.raises(CheckpointError) as error:
        CODIModel.from_pretrained(str(tmp_path))
    assert "adapter_model.safetensors lacks 1 tensor(s)" in _one_line(error) and lost in str(error.value)
    save_file(weights, str(adapter))
    extra = load_file(str(tmp_path / "codi_extra.safetensors"))
    save_file({**extra, "prj.9.weight": torch.zeros(2)}, str(tmp_path / "codi_extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"codi_extra.safetensors holds 1 tensor\(s\).*prj.9.weight"):
        CODIModel.from_pretrained(str(tmp_path))


# --------------------------------------------------------------------------------------------------
# Configuration files


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda c: c.update(format_version="1"), "format_version"),
        (lambda c: c.update(special_token_ids=[0, 1, 2]), "special_token_ids"),
        (lambda c: c.update(vocab_rows="402"), "vocab_rows"),
        (lambda c: c["model_args"].update(lora_r="8"), "model_args.lora_r"),
        (
            lambda c: c["objective"]["loss"].update(distill_loss_weight=2.0),
            "objective.loss.distill_loss_weight",
        ),
        (
            lambda c: c["objective"].update(method="quiet_star"),
            "objective.method: unknown method 'quiet_star'",
        ),
    ],
)
def test_codi_config_fields_are_checked_against_their_dataclasses(make_model, tmp_path, damage, named):
    make_model("gpt2").save_pretrained(str(tmp_path))
    _edit_json(tmp_path / "codi_config.json", damage)
    with pytest.raises(CheckpointError) as error:
        CODIModel.from_pretrained(str(tmp_path))
    assert "codi_config.json" in _one_line(error) and named in str(error.value)


def test_garbage_or_inconsistent_adapter_config_is_refused(make_model, tmp_path):
    make_model("gpt2").save_pretrained(str(tmp_path))
    config = tmp_path / "adapter_config.json"
    original = config.read_text()
    _edit_json(config, lambda c: c.update(r=4))
    with pytest.raises(CheckpointError, match=r"adapter_config.json: does not agree .*r 4 != 8"):
        CODIModel.from_pretrained(str(tmp_path))
    config.write_text("{ this is not json")
    with pytest.raises(CheckpointError, match=r"adapter_config.json: truncated or corrupt JSON"):
        CODIModel.from_pretrained(str(tmp_path))
    config.write_text(original)
    CODIModel.from_pretrained(str(tmp_path))


def test_adapter_check_takes_unrecorded_lora_settings_from_the_model_arguments(tmp_path, monkeypatch):
    """A `codi_config.json` without lora_r / lora_alpha was trained with `CODIModelArguments`' defaults:
    the adapter is checked against those, wherever they are set."""
    from codi.io.checkpoint_checks import check_files

    defaults = {field.name: field.default for field in dataclasses.fields(CODIModelArguments)}
    for name in ("tokenizer_config.json", "adapter_model.safetensors", "codi_extra.safetensors"):
        (tmp_path / name).write_text("{}")  # only their presence is checked here
    adapter = {"r": defaults["lora_r"], "lora_alpha": defaults["lora_alpha"], "peft_type": "LORA"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(adapter))
    check_files(str(tmp_path), {"model_args": {}})
    for name, key in (("lora_r", "r"), ("lora_alpha", "lora_alpha")):
        with monkeypatch.context() as patch:
            patch.setattr(CODIModelArguments.__dataclass_fields__[name], "default", defaults[name] + 1)
            with pytest.raises(CheckpointError, match=rf"{key} {defaults[name]} != {defaults[name] + 1}"):
                check_files(str(tmp_path), {"model_args": {}})
    with monkeypatch.context() as patch:  # a full fine-tune by default: no adapter is looked for
        patch.setattr(CODIModelArguments.__dataclass_fields__["use_lora"], "default", False)
        (tmp_path / "adapter_config.json").unlink()
        (tmp_path / "adapter_model.safetensors").rename(tmp_path / "model.safetensors")
        check_files(str(tmp_path), {"model_args": {}})


@pytest.mark.parametrize(
    "use_lora, lost, named",
    [
        (True, ["adapter_model.safetensors"], "adapter_model.safetensors not found"),
        (False, ["model.safetensors"], "model.safetensors not found"),
        (True, ["codi_extra.safetensors"], "codi_extra.safetensors: file not found"),
        (True, ["adapter_config.json"], "adapter_config.json: file not found"),
        (True, ["tokenizer.json", "tokenizer_config.json"], "no tokenizer files"),
    ],
)
def test_a_missing_file_is_named_by_the_one_files_check_before_the_model_is_built(
    make_model, tmp_path, monkeypatch, use_lora, lost, named
):
    """`check_files` alone accounts for every file a checkpoint folder needs (weights, extras, adapter
    config, tokenizer): the folder is refused in one line before a model is built from it."""
    from codi.io.checkpoint_checks import check_files

    make_model("gpt2", use_lora=use_lora).save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "codi_config.json").read_text())
    check_files(str(tmp_path), config)
    for name in lost:
        (tmp_path / name).unlink()
    with pytest.raises(CheckpointError, match=named):
        check_files(str(tmp_path), config)

    def never(*args, **kwargs):
        raise AssertionError("a model was built from an incomplete folder")

    monkeypatch.setattr("codi.io.checkpoint.build_lm", never)
    with pytest.raises(CheckpointError) as error:
        CODIModel.from_pretrained(str(tmp_path))
    assert named in _one_line(error) and str(tmp_path) in str(error.value)


def test_tokenizer_errors_name_the_file(make_model, tmp_path):
    make_model("gpt2").save_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(CheckpointError) as error:
        CODIModel.from_pretrained(str(tmp_path))
    assert f"{tmp_path / 'tokenizer.json'}: truncated or corrupt JSON" in _one_line(error)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer files .*incomplete checkpoint") as error:
        CODIModel.from_pretrained(str(tmp_path))
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize(
    "content, named",
    [
        ("{ this is not json", "truncated or corrupt JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"format": "coconut"}', "missing key 'settings'"),
        ('{"settings": {"c_thought": "2"}}', "settings.c_thought: '2' is not a valid int"),
        ('{"settings": {"thoughts": 2}}', "settings.thoughts: unknown key"),
        ('{"settings": {"uniform_prob": 1.5}}', "uniform_prob must be in [0, 1]"),
    ],
)
def test_a_bad_coconut_config_is_one_line_before_the_model_is_built(
    tiny_gpt2, tmp_path, monkeypatch, content, named
):
    from codi.io.loader import load

    folder = _coconut_checkpoint(tiny_gpt2, tmp_path / "coconut")
    (tmp_path / "coconut" / "coconut_config.json").write_text(content)

    def never(*args, **kwargs):
        raise AssertionError("the model was built before coconut_config.json was read")

    monkeypatch.setattr("codi.io.checkpoint.build_lm", never)
    with pytest.raises(CheckpointError) as error:
        load(folder)
    message = _one_line(error)
    assert message.startswith(f"{tmp_path / 'coconut' / 'coconut_config.json'}: ") and named in message


def test_lora_checkpoint_without_a_base_fingerprint_warns_naming_the_base(make_model, tmp_path, caplog):
    make_model("gpt2").save_pretrained(str(tmp_path / "ckpt"))
    _edit_json(tmp_path / "ckpt" / "codi_config.json", lambda c: c.pop("base_fingerprint"))
    other = save_tiny_model(str(tmp_path / "other"), arch="gpt2", seed=1)  # same shapes, other weights
    with caplog.at_level(logging.WARNING, logger="codi.io.checkpoint_checks"):
        CODIModel.from_pretrained(str(tmp_path / "ckpt"), base_model_name_or_path=other)
    assert "records no base fingerprint" in caplog.text and other in caplog.text


# --------------------------------------------------------------------------------------------------
# Commands that need latent thoughts


def _coconut_checkpoint(tiny_gpt2: str, path) -> str:
    from codi.methods.coconut.model import CoconutModel

    args = CODIModelArguments(model_name_or_path=tiny_gpt2, lora_r=4, prj_dim=8, num_latent=2)
    CoconutModel.from_base(args, TrainingObjective("coconut")).save_pretrained(str(path))
    return str(path)


def test_probe_and_ablate_refuse_checkpoints_without_latents(make_model, tiny_gpt2, tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": RECORDS[0].question, "answer": "#### 42"}) + "\n")
    make_model("gpt2", method="cot_sft").save_pretrained(str(tmp_path / "cot"))
    make_model("gpt2", method="no_cot_sft").save_pretrained(str(tmp_path / "nocot"))
    coconut = _coconut_checkpoint(tiny_gpt2, tmp_path / "coconut")
    runs = [
        (["probe", "--model", str(tmp_path / "cot")], "'cot_sft'"),
        (["probe", "--model", coconut], "'coconut'"),
    ]
    common = ["--data", str(data), "--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    for argv, method in runs:
        assert cli.main([*argv, *common, "--no_predict", "True"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith(f"codi {argv[0]}: error: codi {argv[0]} needs latent thoughts")
        assert f"trained with method {method}" in lines[-1]
    argv = ["ablate", "--model", str(tmp_path / "nocot"), *common, "--interventions", "zero"]
    assert cli.main([*argv, "--max_new_tokens", "2", "--no_progress", "True"]) == 2
    assert "trained with method 'no_cot_sft'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Nothing answerable


def test_eval_and_probe_refuse_when_no_question_fits_naming_the_limit(make_model, tmp_path, capsys):
    from codi.analysis.probe import probe
    from codi.data.eval_data import EvalItem, eval_set_spec
    from codi.inference.evaluate import evaluate_sets

    model = make_model("gpt2")
    limit = model.hf_model.config.n_positions
    long_question = "Tom has 12 apples. " * (limit // 4)
    items = [EvalItem(long_question, 42.0, "long.jsonl:1"), EvalItem(long_question, 1.0, "long.jsonl:2")]
    with pytest.raises(ValueError, match=rf"none of the 2 question\(s\).*the model's {limit} positions"):
        evaluate_sets(model, [(eval_set_spec("gsm8k"), items)], max_new_tokens=2, warmup=False)
    with pytest.raises(ValueError, match=rf"probe: none of the 1 question\(s\).*{limit} positions"):
        probe(model, [long_question], predict=False)
    model.save_pretrained(str(tmp_path / "ckpt"))
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"question": long_question, "answer": "#### 42"}) + "\n")
    argv = ["eval", "--model", str(tmp_path / "ckpt"), "--data_file", str(data), "--device", "cpu"]
    assert cli.main([*argv, "--output_dir", str(tmp_path / "out"), "--no_progress", "True"]) == 2
    assert "none of the 1 question(s) can be answered" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Numbers


@pytest.mark.parametrize(
    "gold", ["inf", "nan", "Infinity", "-inf", "1_000", "#### 1_000", "1e3", "1" + "0" * 400]
)
def test_non_finite_and_non_decimal_gold_answers_are_flagged(gold, caplog):
    from codi.inference.scoring import parse_gold

    with caplog.at_level(logging.WARNING, logger="codi.inference.scoring"):
        assert parse_gold(gold, "g.jsonl:7") is None
    assert "g.jsonl:7" in caplog.text and "not a finite decimal number" in caplog.text


def test_infinities_are_never_correct_and_flagged_in_training_data(make_model):
    from codi.data.dataset import build_dataset
    from codi.data.records import RawRecord
    from codi.inference.scoring import extract_answer, is_correct, parse_gold

    huge, twice = "1" + "0" * 400, "2" + "0" * 400
    assert not is_correct(extract_answer(f"The answer is: {twice}"), float(huge))  # both read as inf
    assert not is_correct(float("nan"), float("nan"))
    assert parse_gold(10**400) is None and parse_gold(1000) == 1000.0 and parse_gold("1,000") == 1000.0
    model = make_model("gpt2")
    records = [*RECORDS[:1], RawRecord("Big?", "<<1*1=1>>", f"#### {huge}", "big.txt:2")]
    _, stats = build_dataset(records, model.tokenizer, bot_id=model.bot_id, eot_id=model.eot_id)
    assert stats.kept == 2 and stats.flagged["non_numeric_answer"] == 1
    assert stats.first_flagged["non_numeric_answer"].startswith("big.txt:2")

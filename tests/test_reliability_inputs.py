"""Inputs that used to give silently wrong results, and a new user's first hour: each case gets one line
naming the file, line, key or flag, or the behaviour a careful user expects (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO_ROOT
from test_cli import one_line_error, run

from codi.data.dataset import build_dataset
from codi.data.records import DataError, RawRecord, read_records


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_gpt2) -> str:
    from codi.config import CODIModelArguments
    from codi.model import CODIModel

    path = str(tmp_path_factory.mktemp("inputs") / "codi")
    args = CODIModelArguments(model_name_or_path=tiny_gpt2, lora_r=8, lora_alpha=16, prj_dim=16, num_latent=2)
    CODIModel.from_base(args).save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------------
# Silent wrong results


def test_unknown_record_key_names_file_line_key_and_the_accepted_names(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"question": "A?", "cot": "<<1+1=2>>", "answer": "#### 2"},
        {"question": "B?", "CoT": "<<2+2=4>>", "answer": "#### 4"},  # read as GSM8k with no CoT before
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError) as caught:
        read_records(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}:2: unknown key 'CoT'. Did you mean: cot?") and "\n" not in message
    assert "question, cot, answer" in message
    path.write_text(json.dumps({"question": "C?", "answer": "#### 1", "id": 7}) + "\n")
    with pytest.raises(DataError, match=r"mine.jsonl:1: unknown key 'id'\. A record has the keys"):
        read_records(str(path))


def test_codi_on_records_without_any_chain_of_thought_is_an_error(tiny_gpt2, caplog):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    without = [RawRecord("Tom has 3. How many?", "", "#### 3", f"f.jsonl:{i}") for i in (1, 2)]
    ids = dict(bot_id=1, eot_id=2)
    for method in ("codi", "cot_sft"):
        with pytest.raises(
            DataError, match=r"train: method .* none of the 2 records has one \(first: f.jsonl:1\)"
        ):
            build_dataset(without, tokenizer, method=method, **ids)
    _, stats = build_dataset(without, tokenizer, method="no_cot_sft", **ids)
    assert stats.kept == 2
    mixed = [RawRecord("Q?", "<<1+2=3>> <<3*1=3>>", "#### 3", "f.jsonl:3"), *without]
    _, stats = build_dataset(mixed, tokenizer, **ids)
    assert stats.kept == 3 and "2 of 3 records have no chain of thought (first: f.jsonl:1)" in caplog.text


def test_yaml_null_for_a_value_with_a_default_names_file_and_key(tmp_path, capsys):
    config = tmp_path / "x.yaml"
    for text, message in [
        ("num_latent: null\n", "num_latent: null is not a valid int"),
        ("learning_rate: ~\nlora_r: null\n", "lora_r: null is not a valid int"),
        ("use_lora:\n", "use_lora: null is not a valid boolean"),
    ]:
        config.write_text(text)
        status, _, err = run(["train", "--config", str(config)], capsys)
        line = one_line_error(err)
        assert status == 2 and line.startswith(f"codi train: error: {config}: {message}"), line
    from codi.config import parse_args

    config.write_text("validation_file: null\nlearning_rate: null\n")  # null where null is the default
    _, data, training = parse_args(["--config", str(config), "--output_dir", str(tmp_path / "o")])
    assert data.validation_file is None and training.learning_rate == 8e-4


def test_probe_top_k_beyond_the_vocabulary_is_one_line(checkpoint, tmp_path, capsys):
    data = tmp_path / "d.txt"
    data.write_text("Tom has 3 apples.||<<3+4=7>> #### 7\n")
    argv = ["probe", "--model", checkpoint, "--data", str(data), "--output_dir", str(tmp_path / "o")]
    status, _, err = run([*argv, "--top_k", "1000000", "--no_predict", "True"], capsys)
    (line,) = [line for line in err.splitlines() if line.startswith("codi ")]  # after the loading bar
    assert status == 2 and "--top_k 1000000 exceeds the model's vocabulary (" in line, line
    assert not (tmp_path / "o").exists()


def test_explore_port_range_and_a_network_wide_host(monkeypatch, capsys):
    import codi.analysis.explore

    launched = []
    monkeypatch.setattr(
        codi.analysis.explore, "launch", lambda *args, **kwargs: launched.append(kwargs["host"])
    )
    status, _, err = run(["explore", "--model", "m", "--port", "70000"], capsys)
    assert status == 2 and "--port must be in 1..65535, got 70000" in one_line_error(err)
    status, _, err = run(["explore", "--model", "m", "--top_k", "0"], capsys)
    assert status == 2 and "--top_k must be >= 1, got 0" in one_line_error(err)
    assert not launched
    status, _, err = run(["explore", "--model", "m", "--host", "0.0.0.0"], capsys)
    assert status == 0 and launched == ["0.0.0.0"]
    assert "warning: --host 0.0.0.0 serves the explorer on every network interface" in err
    assert "anyone who can reach it can run the model" in err
    for host in ("127.0.0.1", "localhost", "::1"):
        status, _, err = run(["explore", "--model", "m", "--host", host], capsys)
        assert status == 0 and "warning" not in err


def test_lm_eval_without_arguments_or_a_checkpoint_is_a_usage_error(capsys):
    status, printed, err = run(["lm-eval"], capsys)
    assert status == 2 and not printed and "usage: codi lm-eval" in err
    status, _, err = run(["lm-eval", "--model", "codi", "--tasks", "gsm8k"], capsys)
    assert status == 2 and "--model codi needs --model_args pretrained=DIR" in one_line_error(err)
    base = ["lm-eval", "--model", "codi", "--tasks", "gsm8k", "--model_args"]
    status, _, err = run([*base, "pretrained=x,batch_size=abc"], capsys)
    assert status == 2 and "--model_args batch_size: 'abc' is not a positive integer" in one_line_error(err)
    status, _, err = run([*base, '{"pretrained": "x"}', "--batch_size", "0"], capsys)
    assert status == 2 and "--batch_size: '0' is not a positive integer" in one_line_error(err)
    from codi.cli.lm_eval import check_codi_arguments

    # lm-eval's results then state the batch size used
    assert check_codi_arguments(["--model", "codi", "--model_args", "pretrained=x,batch_size=4"]) == [
        "--batch_size",
        "4",
    ]
    assert check_codi_arguments(["--model", "codi", "-a", "pretrained=x", "batch_size=4", "-b", "8"]) == []


def test_lm_eval_batch_size_in_model_args_is_used(checkpoint, tmp_path):
    """lm-eval's command line passes its own --batch_size (default 1) beside model_args: a batch_size
    in model_args (as `codi lm-eval --help` lists it) was a duplicate keyword, a TypeError traceback."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed")
    from codi.inference.lm_eval_model import CODILM

    harness = {"batch_size": 1, "max_batch_size": None, "device": None}
    model = CODILM.create_from_arg_obj({"pretrained": checkpoint, "batch_size": 4}, harness)
    assert model.batch_size == 4
    model = CODILM.create_from_arg_string(f"pretrained={checkpoint},batch_size=4", harness)
    assert model.batch_size == 4
    assert CODILM.create_from_arg_obj({"pretrained": checkpoint}, {"batch_size": "auto"}).batch_size == 16
    with pytest.raises(ValueError, match="codi: batch_size must be a positive integer"):
        CODILM.create_from_arg_obj({"pretrained": checkpoint, "batch_size": "abc"}, harness)
    with pytest.raises(ValueError, match="codi: model_args needs pretrained=DIR"):
        CODILM.create_from_arg_obj({"mode": "latent"}, harness)


def test_deeply_nested_json_names_the_file(tmp_path):
    from codi.data.eval_data import load_eval_set

    nested = "[" * 100_000 + "]" * 100_000
    for name, text in [
        ("deep.json", nested),
        ("deep.jsonl", json.dumps({"question": "Q?"})[:-1] + ', "cot": ' + nested + "}"),
    ]:
        path = tmp_path / name
        path.write_text(text + "\n")
        where = f"{path}:1" if name.endswith("l") else str(path)
        with pytest.raises(DataError, match=f"^{where}: JSON nested too deeply to read$"):
            read_records(str(path))
        with pytest.raises(DataError, match="nested too deeply"):
            load_eval_set("gsm8k", str(path))


def test_binary_config_file_names_the_file(tmp_path, capsys):
    config = tmp_path / "model.safetensors"
    config.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    for command in ("train", "eval --model m", "lm-eval"):
        status, _, err = run([*command.split(), "--config", str(config)], capsys)
        line = one_line_error(err)
        assert status == 2 and f"{config}: not a YAML text file (byte 0x89 is not UTF-8)" in line, line


# --------------------------------------------------------------------------------------------------
# A new user's first hour


def test_command_help_imports_no_torch(tmp_path):
    """The first `--help` builds the text (TrainingArguments imports torch); later ones print it from the
    cache, without torch: `codi train --help` took 6.3 s, `codi convert --help` 7-8 s."""
    env = dict(os.environ, CODI_CACHE_DIR=str(tmp_path), COLUMNS="100")
    code = (
        "import sys, codi.cli\n"
        "for command in ('train', 'convert'):\n"
        "    assert codi.cli.main([command, '--help']) == 0\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    outputs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO_ROOT
        )
        assert done.returncode == 0, done.stderr
        outputs.append((done.stdout, done.stderr.split()[-1]))
    assert outputs[0][0] == outputs[1][0] and "--learning_rate" in outputs[0][0]
    assert outputs[0][1] == "True" and outputs[1][1] == "False"  # the second run never imported torch


def test_thread_rule_uses_idle_cores_and_respects_omp_num_threads():
    from codi.cli.startup import choose_threads

    assert choose_threads({}, cpus=2, load=2.1) == 1  # a busy 2-core machine: one thread
    assert choose_threads({}, cpus=2, load=0.0) == 2
    assert choose_threads({}, cpus=16, load=3.6) == 12
    assert choose_threads({}, cpus=4, load=40.0) == 1
    assert choose_threads({"LOCAL_WORLD_SIZE": "4"}, cpus=16, load=0.0) == 4  # shared by a launcher's ranks
    assert choose_threads({"OMP_NUM_THREADS": "3"}, cpus=16, load=0.0) is None  # the user's choice
    code = (
        "import os\n"
        "os.getloadavg = lambda: (5.0, 5.0, 5.0)\n"
        "from codi.cli.startup import configure_threads\n"
        "configure_threads()\n"
        "import torch\n"
        "print(torch.get_num_threads())\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr


def test_defaults_follow_the_model_without_a_preset(tiny_gpt2, tmp_path):
    from codi.config import CODIModelArguments, parse_args
    from codi.model import CODIModel

    model_args, _, training = parse_args(["--model_name_or_path", tiny_gpt2, "--output_dir", str(tmp_path)])
    assert model_args.prj_dim is None and training.learning_rate == 8e-4 and training.distill_loss_div_std
    _, _, full = parse_args(["--use_lora", "False", "--output_dir", str(tmp_path)])
    assert full.learning_rate == 5e-5
    _, _, sft = parse_args(["--method", "cot_sft", "--output_dir", str(tmp_path)])
    assert sft.distill_loss_div_std is False
    model = CODIModel.from_base(CODIModelArguments(model_name_or_path=tiny_gpt2, lora_r=8))
    hidden = model.hf_model.get_input_embeddings().weight.shape[1]
    assert model.args.prj_dim == hidden and model.prj[1].out_features == hidden
    model.save_pretrained(str(tmp_path / "m"))
    assert json.loads((tmp_path / "m" / "codi_config.json").read_text())["model_args"]["prj_dim"] == hidden
    assert CODIModel.from_pretrained(str(tmp_path / "m")).args.prj_dim == hidden


def test_every_preset_resolves_to_the_arguments_it_had_before():
    """tests/data/preset_arguments.json: each configs/*.yaml parsed by the code before the defaults
    followed the model (8d2a119), without the machine-dependent use_cpu, dataloader_pin_memory and
    local_rank. prj_dim now comes from the model's hidden size when the preset leaves it out."""
    import dataclasses
    import importlib

    from codi.cli.train import METHOD_ARGUMENTS, requested_method
    from codi.config import ARGUMENT_CLASSES, parse_args, resolve_defaults

    before = json.loads((REPO_ROOT / "tests" / "data" / "preset_arguments.json").read_text())
    hidden = {"gpt2": 768, "runs/gpt2_gsm8k_cot": 768, "meta-llama/Llama-3.2-1B-Instruct": 2048}
    hidden[".cache/smollm2-135m-instruct"] = 576
    presets = sorted(path.name for path in (REPO_ROOT / "configs").glob("*.yaml"))
    assert presets == sorted(before)
    for name in presets:
        argv = ["--config", str(REPO_ROOT / "configs" / name)]
        extra = METHOD_ARGUMENTS.get(requested_method(argv) or "")
        classes = ARGUMENT_CLASSES + (
            (getattr(importlib.import_module(extra[0]), f"{extra[1]}Arguments"),) if extra else ()
        )
        model_args, data_args, training_args, *method_args = parse_args(argv, classes)
        resolve_defaults(model_args, training_args, hidden[model_args.model_name_or_path])
        training = training_args.to_dict()
        for machine in ("use_cpu", "dataloader_pin_memory", "local_rank"):
            training.pop(machine)
        now = {
            "model": dataclasses.asdict(model_args),
            "data": dataclasses.asdict(data_args),
            "training": training,
            "method": [dataclasses.asdict(settings) for settings in method_args],
        }
        assert json.loads(json.dumps(now, default=lambda v: getattr(v, "value", str(v)))) == before[name], (
            name
        )

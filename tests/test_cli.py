"""The command line: every command reads `--config x.yaml`, answers an unknown flag or YAML key with the
closest names in one line, and its help lists exactly the flags it accepts. No model is loaded here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from codi import cli


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def write_yaml(tmp_path, text: str, name: str = "x.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# (command, its required flags, a misspelt flag, a name the error must suggest)
COMMANDS = [
    ("eval", ["--model", "m"], "--modle", "model"),
    ("probe", ["--model", "m", "--data", "d", "--output_dir", "o"], "--top_kk", "top_k"),
    ("convert", ["--reference_checkpoint", "r", "--output_dir", "o"], "--lora_rr", "lora_r"),
    ("demo", [], "--presett", "preset"),
    ("data synth", ["--out", "o"], "--n_trian", "n_train"),
    ("export-smollm2", ["--output_dir", "o"], "--out", "output_dir"),
    ("train", [], "--num_latents", "num_latent"),
]


@pytest.mark.parametrize(("command", "required", "typo", "suggestion"), COMMANDS)
def test_unknown_flag_gets_the_closest_names_in_one_line(command, required, typo, suggestion, capsys):
    status, _, err = run([*command.split(), *required, typo, "1"], capsys)
    line = one_line_error(err)
    assert status == 2 and line.startswith(f"codi {command}: error: unknown argument {typo[2:]!r}")
    assert f"Did you mean: {suggestion}" in line or f", {suggestion}" in line


@pytest.mark.parametrize(("command", "required", "typo", "suggestion"), COMMANDS)
def test_unknown_yaml_key_names_the_file_and_the_closest_names(
    command, required, typo, suggestion, tmp_path, capsys
):
    config = write_yaml(tmp_path, f"{typo[2:]}: 1\n")
    status, _, err = run([*command.split(), "--config", config, *required], capsys)
    line = one_line_error(err)
    assert status == 2 and f"unknown argument {typo[2:]!r} in {config}" in line and suggestion in line


@pytest.mark.parametrize(
    ("command", "yaml_text", "message"),
    [
        # each value, read from the YAML, decides the error raised before any model loads
        ("eval", "model: m\ndatasets: nope\n", "unknown evaluation set 'nope'"),
        ("probe", "model: m\ndata: /nonexistent/probe.txt\noutput_dir: o\n", "/nonexistent/probe.txt"),
        ("convert", "reference_checkpoint: /nonexistent/ckpt.bin\noutput_dir: o\n", "/nonexistent/ckpt.bin"),
        ("demo", "preset: smoke\nset: [nope=1]\n", "unknown preset field"),
        ("train", "distill_loss_type: huber\n", "distill_loss_type must be one of"),
    ],
)
def test_config_values_are_read(command, yaml_text, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = run([command, "--config", write_yaml(tmp_path, yaml_text)], capsys)
    assert status == 2 and message in one_line_error(err)


def test_data_synth_config_with_flags_winning(tmp_path, capsys):
    config = write_yaml(tmp_path, "n_train: 7\nn_validation: 2\nn_test: 3\nmodulus: 0\nwording: uniform\n")
    out = tmp_path / "synth"
    status, printed, _ = run(
        ["data", "synth", "--config", config, "--out", str(out), "--n_test", "4"], capsys
    )
    assert status == 0 and "train:" in printed
    saved = json.loads((out / "synth_config.json").read_text())
    assert saved["sizes"] == {"train": 7, "validation": 2, "test": 4}
    assert saved["modulus"] is None and saved["wording"] == "uniform"  # 0 means plain arithmetic


def test_export_smollm2_reads_its_config(tmp_path, capsys):
    done = tmp_path / "smollm2"
    done.mkdir()
    (done / "config.json").write_text("{}")  # an export already there is left as is (no GGUF needed)
    status, printed, _ = run(
        ["export-smollm2", "--config", write_yaml(tmp_path, f"output_dir: {done}\n")], capsys
    )
    assert status == 0 and f"written to {done}" in printed


def test_demo_export_flag_moved_to_its_own_command(capsys):
    status, _, err = run(["demo", "--export_smollm2", "x"], capsys)
    assert status == 2 and "codi export-smollm2 --output_dir DIR" in one_line_error(err)


def test_yaml_value_of_the_wrong_type_names_file_and_key(tmp_path, capsys):
    for text, message in [
        ("lora_r: abc\n", "lora_r: 'abc' is not a valid int"),
        ("use_lora: maybe\n", "use_lora: 'maybe' is not a valid boolean"),
        ("num_latent: [1, 2]\n", "num_latent: expected one value, got a list of 2"),
    ]:
        config = write_yaml(tmp_path, text)
        status, _, err = run(["train", "--config", config], capsys)
        line = one_line_error(err)
        assert status == 2 and line.startswith(f"codi train: error: {config}: {message}"), line


def test_flag_value_of_the_wrong_type_is_one_line(capsys):
    status, _, err = run(["eval", "--model", "m", "--batch_size", "many"], capsys)
    assert status == 2 and "argument --batch_size: invalid int value: 'many'" in one_line_error(err)


def test_report_to_a_missing_integration_is_one_line(tmp_path, capsys, monkeypatch):
    import transformers.integrations.integration_utils as integrations

    monkeypatch.setattr(integrations, "is_tensorboard_available", lambda: False)
    status, _, err = run(["train", "--report_to", "tensorboard", "--output_dir", str(tmp_path)], capsys)
    assert status == 2 and "--report_to tensorboard: tensorboard is not installed" in one_line_error(err)
    status, _, err = run(["train", "--report_to", "tensorbord", "--output_dir", str(tmp_path)], capsys)
    assert status == 2 and "Did you mean: tensorboard" in one_line_error(err)


def test_train_help_lists_what_it_accepts(capsys):
    status, printed, _ = run(["train", "--help"], capsys)
    assert status == 0 and printed.startswith("usage: codi train ")
    assert "--config YAML" in printed and "--num_latent" in printed and "--use_lora [true|false]" in printed
    assert "--num-latent" not in printed and "--no_use_lora" not in printed and "--no-use-lora" not in printed
    # what the help does not list is refused
    status, _, err = run(["train", "--no_use_lora"], capsys)
    assert status == 2 and "Did you mean: use_lora" in one_line_error(err)


@pytest.mark.parametrize("command", [name for name in cli.COMMANDS if name != "train"])
def test_every_command_help_names_itself_and_lists_config(command, capsys):
    status, printed, _ = run([*command.split(), "--help"], capsys)
    assert status == 0 and printed.startswith(f"usage: codi {command} ") and "--config YAML" in printed
    names = {word[2:].rstrip(".,:;)") for word in printed.split() if word.startswith("--")}
    assert not [name for name in names if "-" in name]  # no `--num-latent` style aliases
    assert not [
        name for name in names if name.startswith("no_") and name[3:] in names
    ]  # no `--no_X` complement


def test_top_level_help_is_fast_and_imports_no_torch():
    code = "import sys, codi.cli; codi.cli.main(['--help']); assert 'torch' not in sys.modules, 'torch'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "usage: codi COMMAND" in done.stdout and "export-smollm2" in done.stdout


def test_version_and_unknown_commands(capsys):
    import codi

    status, printed, _ = run(["--version"], capsys)
    assert status == 0 and printed.strip() == f"codi {codi.__version__}"
    status, _, err = run(["trian"], capsys)
    assert status == 2 and "Did you mean: train?" in one_line_error(err)
    status, _, err = run(["data", "synt"], capsys)
    assert status == 2 and "Did you mean: data synth?" in one_line_error(err)
    status, _, err = run(["data"], capsys)
    assert status == 2 and "data synth" in err


def test_settings_made_ineffective_by_another_are_named(tmp_path):
    import torch

    from codi.cli.train import ineffective_settings
    from codi.config import parse_args

    argv = [
        "--use_lora",
        "False",
        "--lora_r",
        "8",
        "--fix_attn_mask",
        "--fp16",
        "True",
        "--output_dir",
        str(tmp_path),
    ]
    model_args, _, training_args = parse_args(argv)
    notes = ineffective_settings(model_args, training_args)
    assert "lora_r ignored: use_lora is False (full fine-tuning)" in notes
    assert "fix_attn_mask has no effect without reference_compat" in notes
    assert (
        any(note.startswith("fp16 has no effect on the CPU") for note in notes) != torch.cuda.is_available()
    )
    model_args, _, training_args = parse_args(["--output_dir", str(tmp_path)])
    assert ineffective_settings(model_args, training_args) == []

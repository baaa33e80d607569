"""codi.config: reference flags, aliases, YAML presets, unknown keys, validation."""

from __future__ import annotations

import shlex

import pytest
import torch
from conftest import REPO_ROOT

from codi.config import (
    CODIDataArguments,
    CODIModelArguments,
    CODITrainingArguments,
    args_from_dict,
    parse_args,
)

# docs/method.md#presets: preset -> (base model, data, batch, accum, epochs, lr, prj_dim, beta, max_token_num)
PRESET_TABLE = {
    "gpt2_gsm8k-aug": ("gpt2", "zen-E/GSM8k-Aug", 64, 2, 40, 3e-3, 768, 1.0, 1000),
    "gpt2_gsm8k-aug-nl": ("gpt2", "zen-E/GSM8k-Aug-NL", 64, 2, 40, 3e-3, 768, 1.0, 1000),
    "llama1b_gsm8k-aug": (
        "meta-llama/Llama-3.2-1B-Instruct",
        "zen-E/GSM8k-Aug",
        32,
        4,
        10,
        8e-4,
        2048,
        20.0,
        200,
    ),
    "llama1b_gsm8k-aug-nl": (
        "meta-llama/Llama-3.2-1B-Instruct",
        "zen-E/GSM8k-Aug-NL",
        32,
        4,
        3,
        8e-4,
        2048,
        20.0,
        256,
    ),
    "gpt2_commonsense": ("gpt2", "zen-E/CommonsenseQA-GPT4omini", 64, 2, 50, 3e-3, 768, 1.0, 1000),
}
REFERENCE_SCRIPT = {
    "gpt2_gsm8k-aug": "scripts/train_gpt2_gsm8k-aug.sh",
    "gpt2_gsm8k-aug-nl": "scripts/train_gpt2_gsm8k-aug-nl.sh",
    "llama1b_gsm8k-aug": "scripts/train_llama1b_gsm8k-aug.sh",
    "llama1b_gsm8k-aug-nl": "scripts/train_llama1b_gsm8k-aug-nl.sh",
    "gpt2_commonsense": "scripts/train_gpt2_commonsense.sh",
}


def write(tmp_path, text: str, name: str = "preset.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("preset", sorted(PRESET_TABLE))
def test_presets_match_the_spec_table(preset, tmp_path):
    path = REPO_ROOT / "configs" / f"{preset}.yaml"
    header = path.read_text().splitlines()[:4]
    assert any(REFERENCE_SCRIPT[preset] in line for line in header), header
    model, data, training = parse_args(["--config", str(path), "--output_dir", str(tmp_path)])
    base, data_name, batch, accum, epochs, lr, prj_dim, beta, max_tok = PRESET_TABLE[preset]
    assert model.model_name_or_path == base and data.data_name == data_name
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (batch, accum)
    assert batch * accum == 128
    assert training.num_train_epochs == epochs and training.learning_rate == pytest.approx(lr)
    assert model.prj_dim == prj_dim and training.distill_loss_factor == beta and data.max_token_num == max_tok
    # common settings
    assert training.seed == 11 and training.bf16
    assert training.lr_scheduler_type.value == "cosine"
    assert training.warmup_ratio == pytest.approx(0.03) and training.warmup_steps == pytest.approx(0.03)
    assert training.weight_decay == pytest.approx(0.1) and training.max_grad_norm == pytest.approx(2.0)
    assert model.use_lora and (model.lora_r, model.lora_alpha, model.lora_dropout) == (128, 32, 0.1)
    assert model.num_latent == 6 and model.use_prj and model.prj_dropout == 0.0 and not model.prj_no_ln
    assert training.distill_loss_div_std and training.distill_loss_type == "smooth_l1"
    assert training.ref_loss_factor == 1.0 and model.remove_eos
    assert training.method == "codi" and data.validation_file is None and not data.include_last_cot
    assert (
        data.cot_style
        == {"gsm8k-aug": "equation", "gsm8k-aug-nl": "nl", "commonsense": "commonsense"}[
            preset.split("_", 1)[1]
        ]
    )


REFERENCE_GPT2_FLAGS = """
    --output_dir {out} --expt_name gsm8k_llama1b_latent_baseline --logging_dir {out}/logs --logging_steps 10
    --model_name_or_path gpt2 --data_name icot --seed 11 --model_max_length 512
    --per_device_train_batch_size 64 --gradient_accumulation_steps 2 --bf16 --num_train_epochs 40
    --learning_rate 3e-3 --max_grad_norm 2.0 --use_lora True --lora_r 128 --lora_alpha 32 --lora_init
    --save_strategy no --save_safetensors False --save_total_limit 1 --weight_decay 0.1 --warmup_ratio 0.03
    --lr_scheduler_type cosine --do_train --report_to none --num_latent 6 --logging_strategy steps
    --use_prj True --prj_dim 768 --prj_dropout 0.0 --distill_loss_div_std True --exp_mode False
    --exp_data_num 2000 --remove_eos True --print_ref_model_stats True
"""


def test_reference_script_flags_parse_unchanged(tmp_path):
    """The authors' train_gpt2_gsm8k-aug.sh flags (report_to aside: tensorboard is not installed here)."""
    argv = shlex.split(REFERENCE_GPT2_FLAGS.format(out=tmp_path))
    model, data, training = parse_args(argv)
    assert training.bf16 and training.do_train and model.lora_init
    assert training.run_name == "gsm8k_llama1b_latent_baseline"
    assert data.data_name == "icot" and data.max_train_samples is None  # exp_mode False
    assert model.num_latent == 6 and training.distill_loss_div_std


def test_old_spellings_are_aliases_on_the_command_line_and_in_yaml(tmp_path):
    cli = ["--mse_loss_factor", "20", "--mse_loss_div_std", "True", "--mse_loss_type=l2"]
    _, _, training = parse_args([*cli, "--output_dir", str(tmp_path)])
    assert (training.distill_loss_factor, training.distill_loss_div_std, training.distill_loss_type) == (
        20.0,
        True,
        "l2",
    )
    preset = write(tmp_path, "mse_loss_factor: 5\nmse_loss_div_std: true\nmse_loss_type: l1\n")
    _, _, training = parse_args(["--config", preset, "--output_dir", str(tmp_path)])
    assert (training.distill_loss_factor, training.distill_loss_div_std, training.distill_loss_type) == (
        5.0,
        True,
        "l1",
    )
    built = args_from_dict({"mse_loss_factor": 3.0, "output_dir": str(tmp_path)}, CODITrainingArguments)
    assert built.distill_loss_factor == 3.0


def test_command_line_overrides_the_preset(tmp_path):
    preset = write(tmp_path, "num_latent: 3\nlearning_rate: 0.1\nlora_target_modules: [c_attn, c_fc]\n")
    model, _, training = parse_args(["--config", preset, "--num_latent", "5", "--output_dir", str(tmp_path)])
    assert model.num_latent == 5 and training.learning_rate == 0.1
    assert model.lora_target_modules == ["c_attn", "c_fc"]
    model, _, _ = parse_args([f"--config={preset}", "--output_dir", str(tmp_path)])
    assert model.num_latent == 3


def test_unknown_key_in_yaml_lists_close_names(tmp_path):
    preset = write(tmp_path, "num_latents: 6\n")
    with pytest.raises(
        ValueError, match=r"unknown argument 'num_latents' in .*preset.yaml.*Did you mean: num_latent"
    ):
        parse_args(["--config", preset])


def test_unknown_flag_on_the_command_line_lists_close_names():
    with pytest.raises(ValueError, match=r"'distill_loss_factr' in the command line.*distill_loss_factor"):
        parse_args(["--distill_loss_factr", "2"])
    with pytest.raises(ValueError, match="unknown argument 'zzzz'") as error:
        parse_args(["--zzzz", "1"])
    assert "Did you mean" not in str(error.value)


def test_warmup_steps_on_the_command_line_beats_the_presets_ratio(tmp_path):
    preset = str(REPO_ROOT / "configs" / "gpt2_gsm8k-aug.yaml")
    _, _, training = parse_args(["--config", preset, "--warmup_steps", "100", "--output_dir", str(tmp_path)])
    assert training.warmup_steps == 100 and training.get_warmup_steps(10_000) == 100
    _, _, training = parse_args(["--config", preset, "--output_dir", str(tmp_path)])
    assert training.get_warmup_steps(10_000) == 300  # 3 % of the steps


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as done:
        parse_args(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--distill_loss_factor" in out and "--num_latent" in out and "--learning_rate" in out


def test_unknown_key_in_a_dict(tmp_path):
    with pytest.raises(ValueError, match="in CODIModelArguments. Did you mean: prj_dim"):
        args_from_dict({"prj_dimm": 4}, CODIModelArguments)


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("- a\n- b\n", ValueError, "expected a mapping"),
        ("num_latent: [1\n", ValueError, "invalid YAML"),
    ],
)
def test_bad_yaml_files(tmp_path, text, error, message):
    with pytest.raises(error, match=message):
        parse_args(["--config", write(tmp_path, text)])


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="config file not found"):
        parse_args(["--config", "/nonexistent/preset.yaml"])
    with pytest.raises(ValueError, match="--config needs a path"):
        parse_args(["--config"])


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (CODIModelArguments, {"lora_r": 0}, "lora_r must be positive"),
        (CODIModelArguments, {"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        (CODIModelArguments, {"num_latent": -1}, "num_latent must be >= 0"),
        (CODIModelArguments, {"remove_eos": False}, "remove_eos=False is not supported"),
        (CODIModelArguments, {"dtype": "fp8"}, "dtype must be"),
        (CODIModelArguments, {"answer_prompt": "  "}, "answer_prompt must not be empty"),
        (CODIDataArguments, {"cot_style": "prose"}, "cot_style must be"),
        (CODIDataArguments, {"max_token_num": 0}, "max_token_num must be positive"),
        (CODIDataArguments, {"max_train_samples": 0}, "max_train_samples must be positive"),
        (CODITrainingArguments, {"method": "quiet_star"}, "method must be one of"),
        (CODITrainingArguments, {"distill_loss_type": "smoothl1"}, "distill_loss_type must be one of"),
        (CODITrainingArguments, {"distill_loss_factor": -1.0}, "distill_loss_factor must be >= 0"),
        (CODITrainingArguments, {"warmup_ratio": 1.5}, r"warmup_ratio must be in \[0, 1\)"),
        (CODITrainingArguments, {"latent_step_loss_factor": -1.0}, "latent_step_loss_factor must be >= 0"),
        (
            CODITrainingArguments,
            {"latent_step_loss_factor": 1.0, "method": "cot_sft"},
            "applies to method codi only",
        ),
    ],
)
def test_validation_errors(cls, kwargs, message, tmp_path):
    if cls is CODITrainingArguments:
        kwargs = {**kwargs, "output_dir": str(tmp_path)}
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_latent_step_supervision_is_off_by_default_and_settable():
    _, _, training = parse_args([])
    assert training.latent_step_loss_factor == 0.0  # the paper's objective unless asked
    _, _, training = parse_args(["--latent_step_loss_factor", "0.5"])
    assert training.latent_step_loss_factor == 0.5


def test_validation_errors_surface_through_parse_args():
    with pytest.raises(ValueError, match="distill_loss_type must be one of"):
        parse_args(["--distill_loss_type", "huber"])


def test_reference_helpers(tmp_path):
    data = CODIDataArguments(exp_mode=True, exp_data_num=7)
    assert data.max_train_samples == 7
    assert CODIDataArguments(data_name="commonsense").cot_style == "commonsense"
    assert CODIDataArguments(data_name="zen-E/GSM8k-Aug").cot_style == "auto"
    training = CODITrainingArguments(output_dir=str(tmp_path), expt_name="run1", remove_unused_columns=True)
    assert training.run_name == "run1" and training.remove_unused_columns is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_bf16_without_a_gpu_trains_on_the_cpu(tmp_path):
    training = CODITrainingArguments(output_dir=str(tmp_path), bf16=True)
    assert training.bf16 and training.use_cpu
    assert not CODITrainingArguments(output_dir=str(tmp_path)).use_cpu

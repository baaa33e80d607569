"""The TRL-style Python API (`CODIConfig` + `CODITrainer`, Coconut's and iCoT's), the README's script run as
written, and what the command line shares with it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from conftest import RECORDS, REPO_ROOT

from codi import CoconutConfig, CoconutTrainer, CODIConfig, CODITrainer, ICoTConfig, ICoTTrainer
from codi.cli import main
from codi.config import ARGUMENT_CLASSES, parse_args
from codi.data.records import DataError
from codi.methods.coconut import CoconutArguments
from codi.model import CODIModel
from codi.trainer_inputs import parse_config

ROWS = [{"question": r.question, "cot": r.cot, "answer": r.answer.removeprefix("#### ")} for r in RECORDS] * 5
TINY = dict(lora_r=8, lora_alpha=16, prj_dim=16, per_device_train_batch_size=4, report_to="none")


def readme_python_script() -> str:
    """The first Python block of the README's Python section."""
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Python\n") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_script_trains_and_evaluates_on_a_dataset(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """The README's ten lines, as written, on a tiny model and a `datasets.Dataset` built in memory (saved
    as the script's `my_data.jsonl`); only the hub model id and the step budget are swapped."""
    script = readme_python_script()
    assert len(script.strip().splitlines()) <= 10
    for old, new in (('model="gpt2"', f"model={tiny_gpt2!r}"), ("max_steps=1000", "max_steps=3")):
        assert script.count(old) == 1, f"the README script no longer contains {old}"
        script = script.replace(old, new)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    datasets.Dataset.from_list(ROWS).to_json("my_data.jsonl")
    exec(compile(script, "README.md", "exec"), {})
    accuracy = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= accuracy <= 100.0
    model = CODIModel.from_pretrained(str(tmp_path / "runs" / "mine"))
    assert model.args.num_latent == 6 and model.args.model_name_or_path == tiny_gpt2
    with open(tmp_path / "runs" / "mine" / "codi_run.json") as handle:
        assert json.load(handle)["training"]["max_steps"] == 3  # the run record of the folder's rules


def test_bad_dataset_columns_are_one_line_naming_the_column(tiny_gpt2, tmp_path):
    config = CODIConfig(output_dir=str(tmp_path), max_steps=1, **TINY)
    dataset = datasets.Dataset.from_list(ROWS)
    cases = [
        (dataset.remove_columns("cot"), r"train_dataset: no column 'cot' \(columns: question, answer\)"),
        (dataset.rename_column("answer", "Answer"), "no column 'answer'"),
        (datasets.DatasetDict(train=dataset), r"DatasetDict of splits 'train'; pass one split"),
        (
            [*ROWS[:1], {**ROWS[1], "answer": [21]}],
            r"train_dataset\[1\]: column 'answer' must be text, got list",
        ),
        ([], "train_dataset: the dataset has no rows"),
    ]
    for rows, message in cases:
        with pytest.raises(DataError, match=message) as error:
            CODITrainer(model=tiny_gpt2, args=config, train_dataset=rows)
        assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="eval_dataset: no column 'question'"):
        CODITrainer(model=tiny_gpt2, args=config, train_dataset=dataset, eval_dataset=[{"q": "x"}])
    # No-CoT-SFT reads no CoT: a dataset without one is enough; numbers are answers too
    no_cot = CODIConfig(output_dir=str(tmp_path), method="no_cot_sft", max_steps=1, **TINY)
    rows = [{"question": r["question"], "answer": int(r["answer"])} for r in ROWS]
    trainer = CODITrainer(model=tiny_gpt2, args=no_cot, train_dataset=datasets.Dataset.from_list(rows))
    assert trainer.train_stats.kept == len(rows)


def test_a_built_model_and_validation_rows(tiny_gpt2, tmp_path):
    config = CODIConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, eval_strategy="steps", eval_steps=1, **TINY
    )
    model = CODIModel.from_base(
        config.model_args().__class__(model_name_or_path=tiny_gpt2, lora_r=8, prj_dim=16)
    )
    trainer = CODITrainer(model=model, args=config, train_dataset=ROWS, eval_dataset=ROWS[:4])
    assert trainer.model is model and trainer.eval_stats.kept == 4
    trainer.train()
    assert any("eval_loss" in entry for entry in trainer.state.log_history)
    with pytest.raises(TypeError, match="model must be a hub id, a local folder or a CODIModel"):
        CODITrainer(model=object(), args=config, train_dataset=ROWS)


def test_coconut_and_icot_follow_the_same_pattern(tiny_gpt2, tmp_path):
    coconut = CoconutConfig(
        output_dir=str(tmp_path / "coconut"), c_thought=1, max_latent_stage=1, steps_per_stage=1, max_steps=2,
        use_lora=False, **TINY,
    )  # fmt: skip
    assert coconut.method == "coconut" and coconut.num_latent == 1  # c_thought x max_latent_stage
    trainer = CoconutTrainer(model=tiny_gpt2, args=coconut, train_dataset=datasets.Dataset.from_list(ROWS))
    trainer.train()
    trainer.save_model()
    assert [entry["stage"] for entry in trainer.curriculum.history] == [0, 1]
    assert CODIModel.from_pretrained(str(tmp_path / "coconut")).args.num_latent == 1

    icot = ICoTConfig(
        output_dir=str(tmp_path / "icot"), remove_every_steps=1, max_steps=2, num_latent=0, **TINY
    )
    trainer = ICoTTrainer(model=tiny_gpt2, args=icot, train_dataset=datasets.Dataset.from_list(ROWS))
    trainer.train()
    assert trainer.icot.changes == [(1, 1)]
    with pytest.raises(TypeError, match="CoconutTrainer: args must be a CoconutConfig, got CODIConfig"):
        CoconutTrainer(model=tiny_gpt2, args=CODIConfig(output_dir=str(tmp_path), **TINY), train_dataset=ROWS)
    with pytest.raises(ValueError, match="iCoT: method must be icot"):
        ICoTConfig(output_dir=str(tmp_path), method="codi")


def _coconut_argv(model: str, train_file: str, out: Path, *extra: str) -> list[str]:
    argv = ["train", "--method", "coconut", "--model_name_or_path", model, "--train_file", train_file]
    argv += ["--output_dir", str(out), "--use_lora", "False", "--max_steps", "1", "--report_to", "none"]
    return argv + ["--per_device_train_batch_size", "2", "--steps_per_stage", "1", *extra]


def test_coconut_num_latent_flag_is_recorded_or_refused(tiny_gpt2, train_file, tmp_path, capsys):
    """`--method coconut --num_latent 3` recorded 6 (c_thought x max_latent_stage) in the checkpoint: a
    count that differs from the thoughts Coconut trains is refused, naming both; one that agrees, or
    none, is what the checkpoint records."""
    assert main(_coconut_argv(tiny_gpt2, train_file, tmp_path / "a", "--num_latent", "3")) == 2
    error = capsys.readouterr().err.strip()
    assert "num_latent 3: Coconut trains c_thought x max_latent_stage = 2 x 3 = 6" in error
    assert "\n" not in error and not (tmp_path / "a").exists()
    for out, extra, expected in (
        ("b", ["--c_thought", "1", "--max_latent_stage", "3", "--num_latent", "3"], 3),
        ("c", ["--c_thought", "1", "--max_latent_stage", "2"], 2),
    ):
        assert main(_coconut_argv(tiny_gpt2, train_file, tmp_path / out, *extra)) == 0
        with open(tmp_path / out / "codi_config.json") as handle:
            assert json.load(handle)["model_args"]["num_latent"] == expected


def test_command_line_and_python_build_the_same_config(tmp_path):
    """`codi train` parses into one config (what `CODITrainer.run` takes); it equals the three argument
    objects of `parse_args`, and `CODIConfig.from_parts` of them."""
    argv = ["--config", str(REPO_ROOT / "configs" / "gpt2_gsm8k-aug.yaml"), "--output_dir", str(tmp_path)]
    argv += ["--num_latent", "4", "--learning_rate", "0.01", "--mse_loss_factor", "2"]
    config = parse_config(argv)
    model, data, training = parse_args(argv)
    assert config.model_args() == model and config.data_args() == data
    assert config.num_latent == 4 and config.distill_loss_factor == 2.0
    assert all(config.to_dict()[key] == value for key, value in training.to_dict().items())
    assert CODIConfig.from_parts(model, data, training).to_dict() == config.to_dict()
    argv = ["--method", "coconut", "--output_dir", str(tmp_path), "--c_thought", "1"]
    coconut = parse_config(argv, CoconutConfig, (*ARGUMENT_CLASSES, CoconutArguments))
    assert coconut.num_latent == 3 and coconut.method_args() == CoconutArguments(c_thought=1)


def test_staged_checkpoints_rotate_and_keep_the_best_in_the_run_folder(tiny_gpt2, tmp_path):
    """The Trainer writes each checkpoint under `args.output_dir`, pointed at the staging folder for the
    save only: rotation, the best checkpoint's path and the output folder end up as without staging."""
    run = tmp_path / "run"
    config = CODIConfig(
        output_dir=str(run), max_steps=4, save_strategy="steps", save_steps=1, save_total_limit=2,
        eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, **TINY,
    )  # fmt: skip
    trainer = CODITrainer(model=tiny_gpt2, args=config, train_dataset=ROWS, eval_dataset=ROWS[:4])
    trainer.train()
    assert trainer.args.output_dir == str(run)
    best = trainer.state.best_model_checkpoint
    assert os.path.dirname(best) == str(run) and os.path.isdir(best)
    kept = sorted(name for name in os.listdir(run) if name.startswith("checkpoint-"))
    assert "checkpoint-4" in kept and len(kept) <= 2 and os.path.basename(best) in kept
    assert not (run / ".staging").exists()  # nothing staged is left behind


def test_no_private_trainer_or_parser_method_is_overridden():
    found = subprocess.run(
        ["grep", "-rn", r"_parse_dataclass_field\|_get_output_dir", str(REPO_ROOT / "src")],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    assert found == ""


def test_the_package_names_in_the_distribution_metadata():
    """`codi` on PyPI is another project: the distribution is codi-latent; the import package and the
    command stay `codi`."""
    text = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^name = "codi-latent"', text, re.M)
    assert re.search(r'^codi = "codi.cli:main"', text, re.M)
    assert sys.modules["codi"].__name__ == "codi"


def test_one_number_of_latents_for_training_and_inference(make_model, tmp_path):
    """`num_latent` is the count in training and, by default, at inference; the reference's
    `inf_latent_iterations` is another name for it (flags, YAML, old checkpoints' configs), and two
    different values for it in one source are refused."""
    from codi.analysis.probe import probe
    from codi.cli.args import LATENT_ALIASES, UsageError, parse
    from codi.cli.evaluate import EvalArguments
    from codi.config import CODIModelArguments

    out = ["--output_dir", str(tmp_path)]
    assert parse_args(["--inf_latent_iterations", "4", *out])[0].num_latent == 4
    assert parse_args(["--num_latent", "4", "--inf_latent_iterations", "4", *out])[0].num_latent == 4
    with pytest.raises(
        UsageError, match=r"--num_latent 3 and --inf_latent_iterations 6 set the same setting"
    ):
        parse_args(["--num_latent", "3", "--inf_latent_iterations", "6", *out])
    preset = tmp_path / "preset.yaml"
    preset.write_text("num_latent: 3\ninf_latent_iterations: 6\n")
    with pytest.raises(UsageError, match=r"preset.yaml: num_latent 3 and inf_latent_iterations 6"):
        parse_args(["--config", str(preset), *out])
    preset.write_text("num_latent: 6\ninf_latent_iterations: 6\n")  # as every preset of configs/
    assert parse_args(["--config", str(preset), "--num_latent", "2", *out])[0].num_latent == 2
    (args,) = parse(
        "codi eval",
        (EvalArguments,),
        ["--model", "m", "--inf_latent_iterations", "2"],
        aliases=LATENT_ALIASES,
    )
    assert args.num_latent == 2

    arguments = CODIModelArguments(num_latent=3)
    assert (
        arguments.latents() == 3
        and arguments.latents(5) == 5
        and "inf_latent_iterations" not in arguments.to_dict()
    )
    with pytest.raises(ValueError, match="num_latent must be >= 0, got -1"):
        arguments.latents(-1)
    model = make_model("gpt2", num_latent=2)
    assert [o.num_latent_positions for o in model.generate(["Tom has 3 apples."], max_new_tokens=2)] == [2]
    assert len(probe(model, ["Tom has 3 apples."], predict=False)[0].positions) == 3  # <bot> + 2 latents

    # a checkpoint written when the two were separate settings decodes with its inference count
    model.save_pretrained(str(tmp_path / "old"))
    path = tmp_path / "old" / "codi_config.json"
    saved = json.loads(path.read_text())
    saved["model_args"]["inf_latent_iterations"] = 5
    path.write_text(json.dumps(saved))
    assert CODIModel.from_pretrained(str(tmp_path / "old")).args.num_latent == 5


def test_plain_training_arguments_get_the_default_learning_rate(make_model, tmp_path):
    """A built model with plain `CODITrainingArguments` (no config path) still trains at the default rate."""
    from codi.config import LORA_LEARNING_RATE, CODITrainingArguments

    args = CODITrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none")
    assert args.learning_rate is None
    assert CODITrainer(model=make_model("gpt2"), args=args).args.learning_rate == LORA_LEARNING_RATE


def test_the_trainer_api_records_and_checks_the_data_it_trains_on(tiny_gpt2, tmp_path):
    """`CODITrainer(...).train()` (not only `codi train`) fingerprints its records in every checkpoint and
    refuses to resume onto other records."""
    run = tmp_path / "run"

    def config(**extra):
        return CODIConfig(output_dir=str(run), save_strategy="steps", save_steps=1, **TINY, **extra)

    CODITrainer(model=tiny_gpt2, args=config(max_steps=2), train_dataset=ROWS).train()
    record = json.loads((run / "checkpoint-1" / "codi_run.json").read_text())
    assert record["training_data"]["records"] == len(ROWS)
    edited = [{**row, "answer": "7"} for row in ROWS]
    trainer = CODITrainer(model=tiny_gpt2, args=config(max_steps=2), train_dataset=edited)
    with pytest.raises(ValueError, match="differ from the records it was trained on"):
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-1"))

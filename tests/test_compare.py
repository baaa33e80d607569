"""codi.compare: the one-table harness on a user's JSONL train/test pair, its statistics and errors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
from pathlib import Path

import pytest

from codi.compare import (
    METHODS,
    TABLE1_BUDGET,
    TABLE1_OPTIONS,
    Budget,
    MethodUnavailable,
    ModelSpec,
    compare,
)
from codi.compare.methods import icot_step_schedule
from codi.data.synth import SynthConfig, make_splits
from codi.report import t_interval, wilson_interval

TINY = ModelSpec(n_layer=1, n_embd=16, n_head=2, num_latent=2)


def write_pair(directory, n_train=48, n_test=8):
    """A small JSONL train/test pair, as a user would bring it ({question, cot, answer})."""
    splits = make_splits(
        SynthConfig(n_train=n_train, n_validation=0, n_test=n_test, wording="uniform", seed=3)
    )
    paths = {}
    for name in ("train", "test"):
        paths[name] = str(directory / f"{name}.jsonl")
        with open(paths[name], "w") as handle:
            for record in splits[name]:
                handle.write(json.dumps(record) + "\n")
    return paths


def test_two_methods_one_table_on_a_user_jsonl_pair(tmp_path, capsys):
    paths = write_pair(tmp_path)
    budget = Budget(max_steps=4, batch_size=8, cot_warmup_steps=2, eval_batch_size=8, max_new_tokens=12)
    result = compare(
        ["codi", "no_cot_sft"], paths["train"], paths["test"], TINY, budget, [0], str(tmp_path / "out")
    )
    assert [row.method for row in result.rows] == ["codi", "no_cot_sft"]
    codi, no_cot = result.rows
    assert (codi.mode, no_cot.mode) == ("latent", "cot")
    assert codi.n == no_cot.n == 8
    for row in result.rows:
        assert row.ci_kind == "wilson" and 0 <= row.ci_low <= row.accuracy <= row.ci_high <= 100
        assert row.train_wall_s > 0 and row.questions_per_s > 0 and row.steps == 4
    # latent mode decodes <bot>, the latents and <eot> besides the answer tokens
    assert codi.positions_per_answer == pytest.approx(codi.tokens_per_answer + TINY.num_latent + 2)
    assert no_cot.positions_per_answer == pytest.approx(no_cot.tokens_per_answer)
    assert result.runs[0].cot_warmup_s > 0 and result.runs[1].cot_warmup_s == 0
    saved = json.loads(open(result.paths["results.json"]).read())
    assert [row["label"] for row in saved["rows"]] == ["CODI", "No-CoT-SFT"]
    assert saved["config"]["budget"]["max_steps"] == 4
    assert open(result.paths["results.png"], "rb").read(4) == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "CODI" in printed and "No-CoT-SFT" in printed and "accuracy % [95% CI]" in printed


def test_icot_row_and_seeds_give_a_t_interval(tmp_path):
    paths = write_pair(tmp_path, n_train=32, n_test=6)
    budget = Budget(max_steps=3, batch_size=8, eval_batch_size=8, max_new_tokens=10)
    result = compare(["icot"], paths["train"], paths["test"], TINY, budget, [0, 1], str(tmp_path / "out"))
    (row,) = result.rows
    assert row.label == "iCoT-SI" and row.mode == "cot" and row.seeds == [0, 1]
    assert row.ci_kind == "t over seeds" and len(row.seed_accuracies) == 2
    state = json.loads((tmp_path / "out" / "seed1" / "icot" / "icot_state.json").read_text())
    assert state["icot_args"]["removal_smoothing_lambda"] == "4.0"


def test_coconut_options_reach_its_run(tmp_path):
    """compare passes a method's own options through: Coconut's step schedule ends up in its run."""
    paths = write_pair(tmp_path, n_train=16, n_test=2)
    budget = Budget(max_steps=4, batch_size=8, cot_warmup_steps=1, eval_batch_size=8, max_new_tokens=8)
    schedule = dict(steps_per_stage=1, start_stage=1, c_thought=1, max_latent_stage=2)
    compare(["coconut"], paths["train"], paths["test"], TINY, budget, [0], str(tmp_path / "out"),
            options={"coconut": schedule})  # fmt: skip
    saved = json.loads((tmp_path / "out" / "seed0" / "coconut" / "coconut_config.json").read_text())
    assert {key: saved["settings"][key] for key in schedule} == schedule
    metrics = json.loads((tmp_path / "out" / "seed0" / "coconut" / "all_results.json").read_text())
    assert metrics["coconut_stages"] == [1, 2, 3]  # 3 steps after the warm-up: stages 1, 2, final


def test_table1_options_fit_coconut_stages_in_the_budget(tmp_path, monkeypatch):
    from codi import compare as harness
    from codi.methods.coconut import CoconutArguments, stage_for_step

    METHODS["coconut"].check_options(TABLE1_OPTIONS["coconut"])
    settings = CoconutArguments(**TABLE1_OPTIONS["coconut"])
    steps = TABLE1_BUDGET.max_steps - TABLE1_BUDGET.cot_warmup_steps  # after the shared CoT warm-up
    stages = [
        stage_for_step(step, settings.steps_per_stage, settings.max_latent_stage, settings.start_stage)
        for step in range(steps)
    ]
    # stage 0 is the warm-up; each later stage trained, the final one (every step removed) last
    assert {stage: stages.count(stage) for stage in set(stages)} == {1: 400, 2: 400, 3: 400, 4: 800}
    assert settings.inference_latents == 3  # one thought per step of the demo's 3-step chains
    seen = {}
    monkeypatch.setattr(harness, "compare", lambda *args, **kwargs: seen.update(kwargs))
    small = SynthConfig(n_train=8, n_validation=0, n_test=2, wording="uniform", seed=0)
    harness.run_synthetic(["no_cot_sft"], synth=small, out_dir=str(tmp_path))
    assert seen["options"] is TABLE1_OPTIONS
    harness.run_synthetic(["no_cot_sft"], synth=small, out_dir=str(tmp_path), options={})
    assert seen["options"] == {}


def test_errors_name_the_method_or_key(tmp_path):
    paths = write_pair(tmp_path, n_train=8, n_test=2)
    with pytest.raises(ValueError, match="unknown method"):
        compare(["codi", "nope"], paths["train"], paths["test"], TINY, out_dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="unknown key 'nonsense'"):
        compare(
            ["icot"],
            paths["train"],
            paths["test"],
            TINY,
            options={"icot": {"nonsense": 1}},
            out_dir=str(tmp_path),
        )
    with pytest.raises(ValueError, match="cot_warmup_steps"):
        Budget(max_steps=10, cot_warmup_steps=10)
    if importlib.util.find_spec("codi.methods.coconut") is None:
        with pytest.raises(MethodUnavailable, match="coconut"):
            compare(["coconut"], paths["train"], paths["test"], TINY, out_dir=str(tmp_path / "b"))
    assert {"codi", "codi_s", "cot_sft", "no_cot_sft", "icot", "coconut"} <= set(METHODS)


def test_wilson_interval_by_hand():
    low, high = wilson_interval(0, 10)
    assert low == 0 and high == pytest.approx(1.959964**2 / (10 + 1.959964**2))  # 0.2775
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    low, high = wilson_interval(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(10 / (10 + 1.959964**2))
    # it covers the true proportion ~95 % of the time
    rng, hits = random.Random(0), 0
    for _ in range(2000):
        correct = sum(rng.random() < 0.3 for _ in range(50))
        low, high = wilson_interval(correct, 50)
        hits += low <= 0.3 <= high
    assert 0.92 < hits / 2000 < 0.98


def test_t_interval_by_hand():
    mean, low, high = t_interval([40.0, 50.0])
    assert mean == 45 and high - mean == pytest.approx(12.706 * math.sqrt(50) / math.sqrt(2), rel=1e-4)
    mean, low, high = t_interval([1.0, 2.0, 3.0])
    assert (low, high) == pytest.approx((2 - 4.303 / math.sqrt(3), 2 + 4.303 / math.sqrt(3)))


def test_icot_step_schedule_fits_the_budget():
    assert icot_step_schedule(100, 10, 0.5) == {"remove_every_steps": 5}  # 10 tokens gone by step 50
    assert icot_step_schedule(100, 80, 0.5) == {"remove_every_steps": 1, "remove_all_when_remove_beyond": 50}
    assert icot_step_schedule(4, 3, 0.5) == {"remove_every_steps": 1, "remove_all_when_remove_beyond": 2}


@pytest.mark.parametrize("method", ["cot_sft", "no_cot_sft", "icot"])
def test_gsm8k_baseline_presets_parse_with_the_global_batch_stated(method, tmp_path, monkeypatch):
    from codi import config
    from codi.methods.icot import ICoTArguments

    path = Path(__file__).resolve().parents[1] / "configs" / f"gpt2_gsm8k-aug_{method}.yaml"
    header = "\n".join(path.read_text().splitlines()[:12])
    monkeypatch.setattr(config, "METHODS", (*config.METHODS, "icot"))  # until `codi train` knows icot
    classes = (*config.ARGUMENT_CLASSES, ICoTArguments) if method == "icot" else config.ARGUMENT_CLASSES
    parsed = config.parse_args(["--config", str(path), "--output_dir", str(tmp_path)], classes)
    model, data, training = parsed[:3]
    batch = training.per_device_train_batch_size * training.gradient_accumulation_steps
    assert f"GLOBAL BATCH {batch}" in header and training.method == method
    assert model.model_name_or_path == "gpt2" and not model.use_lora and data.include_last_cot
    assert training.lr_scheduler_type.value == "constant"
    if method == "icot":
        icot = parsed[3]
        assert batch == 32 and training.learning_rate == pytest.approx(5e-5)
        assert (icot.remove_per_epoch, icot.remove_all_when_remove_beyond, icot.removal_smoothing_lambda) == (
            8,
            39,
            4,
        )
        assert icot.reset_optimizer and icot.max_len_train == 150 and icot.removal_side == "left"
    else:
        assert (
            batch == 128 and training.learning_rate == pytest.approx(1e-4) and training.num_train_epochs == 25
        )
        assert training.weight_decay == pytest.approx(0.01) and training.max_grad_norm == 0


@pytest.mark.slow
def test_gpu_table1_script_smoke_run_on_cpu(tmp_path):
    """bench/gpu_table1.py --smoke: the GPU script's whole path (table + both benchmarks) at a tiny size
    (~1-2 min on the shared 2-core machine)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "bench/gpu_table1.py", "--smoke", "--device", "cpu", "--out", str(tmp_path)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(repo / "src")},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "accuracy % [95% CI]" in done.stdout and "CoT-SFT" in done.stdout
    summary = json.loads((tmp_path / "gpu_table1.json").read_text())
    assert set(summary["bench"]) == {"train_step", "decode"}
    assert not any("error" in result for result in summary["bench"].values()), summary["bench"]


def test_a_pretrained_model_the_user_names_with_lora_and_a_cot_warmup(tmp_path, tiny_gpt2):
    """`ModelSpec(path=...)`: no tokenizer is built; a LoRA warm-up is merged so CODI starts from it."""
    paths = write_pair(tmp_path, n_train=16, n_test=4)
    spec = ModelSpec(path=tiny_gpt2, use_lora=True, lora_r=4, lora_alpha=8, num_latent=2, prj_dim=16)
    budget = Budget(max_steps=3, batch_size=4, cot_warmup_steps=1, eval_batch_size=4, max_new_tokens=6)
    result = compare(["codi"], paths["train"], paths["test"], spec, budget, [0], str(tmp_path / "out"))
    assert (tmp_path / "out" / "seed0" / "cot_warmup" / "merged" / "config.json").is_file()
    assert not (tmp_path / "out" / "seed0" / "base").exists()
    assert result.rows[0].n == 4 and result.runs[0].cot_warmup_s > 0
    saved = json.loads((tmp_path / "out" / "seed0" / "codi" / "codi_config.json").read_text())
    assert saved["model_args"]["use_lora"] and saved["model_args"]["model_name_or_path"].endswith("merged")


def test_codi_compare_command_on_a_user_jsonl_pair(tmp_path, capsys):
    from codi import cli

    paths = write_pair(tmp_path, n_train=32, n_test=6)
    argv = ["compare", "--train_file", paths["train"], "--test_file", paths["test"]]
    argv += ["--methods", "cot_sft,no_cot_sft", "--max_steps", "3", "--batch_size", "8", "--seeds", "0"]
    argv += ["--n_layer", "1", "--n_embd", "16", "--n_head", "2", "--out_dir", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "CoT-SFT" in printed and "No-CoT-SFT" in printed
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [row["method"] for row in saved["rows"]] == ["cot_sft", "no_cot_sft"]
    assert all(row["n"] == 6 for row in saved["rows"])


def test_coconut_without_a_schedule_walks_every_stage_within_the_budget():
    from codi.compare.methods import METHODS as REGISTRY
    from codi.compare.methods import RunContext, coconut_step_schedule
    from codi.methods.coconut import CoconutArguments

    def ctx(steps, warm):
        return RunContext(REGISTRY["coconut"], 0, "base", "t", "o", Budget(), TINY, {}, "cpu", steps, warm)

    # the demo's table: 2000 steps after a warm-up -> stages 1, 2, 3 for 400 each, the final for 800
    assert coconut_step_schedule(ctx(2000, "warm"), CoconutArguments(c_thought=1), {}) == {
        "steps_per_stage": 400,
        "start_stage": 1,
    }
    assert coconut_step_schedule(ctx(600, None), CoconutArguments(), {})["start_stage"] == 0
    assert coconut_step_schedule(ctx(600, None), CoconutArguments(), {"epochs_per_stage": 1}) == {}


def _no_cot_compare(paths) -> list[str]:
    return [
        "compare",
        "--train_file",
        paths["train"],
        "--test_file",
        paths["test"],
        "--methods",
        "no_cot_sft",
    ]


def test_codi_compare_prints_its_table_once(tmp_path, capsys):
    from codi import cli

    paths = write_pair(tmp_path, n_train=16, n_test=4)
    argv = _no_cot_compare(paths)
    argv += ["--max_steps", "2", "--batch_size", "8", "--n_layer", "1", "--n_embd", "16", "--n_head", "2"]
    assert cli.main([*argv, "--out_dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("accuracy % [95% CI]") == 1  # the header
    assert sum(line.startswith("No-CoT-SFT") for line in printed.splitlines()) == 1  # the row


def test_duplicate_seeds_fail_up_front_in_one_line(tmp_path, capsys):
    from codi import cli

    paths = write_pair(tmp_path, n_train=8, n_test=2)
    argv = _no_cot_compare(paths)
    argv += ["--max_steps", "2", "--seeds", "0,0", "--out_dir", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert "seeds must be distinct, got [0, 0]" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing trained, no folder made


def test_a_method_in_two_modes_gives_two_rows_and_trains_aside(tmp_path):
    """`modes` evaluates one trained model as CoT teacher and in latent mode; `parallel` trains the
    method without a warm-up in a second process; `inspect` sees every trained model."""
    paths = write_pair(tmp_path, n_train=16, n_test=4)
    budget = Budget(max_steps=3, batch_size=8, cot_warmup_steps=1, eval_batch_size=8, max_new_tokens=6)
    seen = []
    result = compare(
        ["no_cot_sft", "codi_s"], paths["train"], paths["test"], TINY, budget, [0], str(tmp_path / "out"),
        modes={"codi_s": ("cot", "latent")}, parallel=True, inspect=lambda ctx, model: seen.append(ctx.method.name),
    )  # fmt: skip
    assert [(row.method, row.mode, row.name) for row in result.rows] == [
        ("no_cot_sft", "cot", "No-CoT-SFT"),
        ("codi_s", "cot", "CODI+S teacher (CoT)"),
        ("codi_s", "latent", "CODI+S latent"),
    ]
    assert sorted(seen) == ["codi_s", "no_cot_sft"]
    assert (tmp_path / "out" / "seed0" / "no_cot_sft" / "codi_config.json").is_file()
    assert all(run.train_wall_s > 0 for run in result.runs)
    with pytest.raises(ValueError, match="modes"):
        compare(["codi"], paths["train"], paths["test"], TINY, budget, modes={"codi": ("nope",)})

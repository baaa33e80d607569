"""The offline demo (presets of the comparison harness): tokenizer, a very small end-to-end run (< 60 s)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from codi.cli.demo import main
from codi.data.synth import SynthConfig, make_splits, to_icot_line
from codi.demo.pipeline import DEMO_MARKER, claim_check, fresh_out_dir, run_demo
from codi.demo.presets import PRESETS
from codi.offline_models import build_tokenizer


def test_tokenizer_digits_are_tokens_and_decoding_is_exact():
    splits = make_splits(SynthConfig(n_train=50, n_validation=5, n_test=5))
    tokenizer = build_tokenizer([to_icot_line(r) for r in splits["train"]])
    text = "It shows 47. <<(47+5)%10=2>> The answer is: 2"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    assert "4" in tokens and "7" in tokens and "47" not in tokens and "<<" in tokens
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.unk_token not in tokenizer.convert_ids_to_tokens(
        tokenizer(to_icot_line(splits["test"][0]))["input_ids"]
    )


def test_fresh_out_dir_never_reuses_silently(tmp_path):
    path = tmp_path / "run"
    assert fresh_out_dir(str(path), overwrite=False) == str(path)
    (path / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        fresh_out_dir(str(path), overwrite=False)
    fresh_out_dir(str(path), overwrite=True)
    assert os.listdir(path) == [DEMO_MARKER]  # the old content is gone; the new run's marker is there


def test_smoke_run_writes_table_json_and_chart(tmp_path, capsys):
    out = fresh_out_dir(str(tmp_path / "demo"), overwrite=False)
    result = run_demo(PRESETS["smoke"], seed=0, out_dir=out, probe=True)
    assert set(result["rows"]) == {"no_cot", "codi_cot", "codi_latent"}
    runs = {(run["method"], run["mode"]): run for run in result["runs"]}
    for row in result["rows"].values():  # accuracy in %, as every table of the harness
        run = runs[row["method"], row["mode"]]
        assert 0.0 <= row["accuracy"] <= 100.0 and row["n"] == PRESETS["smoke"].n_test
        assert row["accuracy"] == pytest.approx(100 * run["correct"] / run["n"])
    assert result["rows"]["codi_cot"]["speedup_vs_cot"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["claim"] == result["claim"] and saved["seed"] == 0
    assert (tmp_path / "demo" / "results.png").stat().st_size > 0
    # the trained models are saved HF-style, so `codi eval` / `codi probe` load them unchanged
    assert (tmp_path / "demo" / "seed0" / "codi_s" / "codi_config.json").is_file()
    assert (tmp_path / "demo" / "seed0" / "base" / "config.json").is_file()
    printed = capsys.readouterr().out
    assert "CODI+S latent" in printed and "No-CoT-SFT" in printed and "speedup" in printed
    # the step supervision is on in the presets that use it, and the table says it is not the paper's
    assert PRESETS["smoke"].latent_step_factor > 0 and "not part of the paper" in printed
    assert any("latent_step_ce" in entry for entry in result["final_logs"]["codi"])


def test_paper_preset_is_the_papers_objective_and_is_labelled_plain_codi():
    from codi.demo.pipeline import method_label

    paper = PRESETS["paper"]
    assert paper.latent_step_factor == 0 and paper.distill_factor == 1.0
    assert method_label(paper) == "CODI" and method_label(PRESETS["default"]) == "CODI+S"
    assert replace(paper, latent_step_factor=0.0) == replace(
        PRESETS["default"], latent_step_factor=0.0, distill_factor=1.0
    )


def _row(mode: str, accuracy: float, tokens: float, positions: float, questions_per_s: float):
    from codi.report import Row

    return Row("m", "M", mode, [0], 500, accuracy, 0.0, 100.0, "wilson", [accuracy], tokens, positions,
               questions_per_s, 1.0, 10)  # fmt: skip


def test_claim_check_uses_the_issue_thresholds():
    rows = {
        "no_cot": _row("cot", 20.0, 6, 6, 100),
        "codi_cot": _row("cot", 90.0, 33, 33, 40),
        "codi_latent": _row("latent", 80.0, 6, 12, 90),
    }
    assert all(claim_check(rows).values())
    rows["codi_latent"].accuracy = 70.0  # < 0.85 x 90
    assert not claim_check(rows)["latent >= 0.85 x teacher CoT"]


def test_cli_rejects_unknown_preset_field(tmp_path):
    with pytest.raises(ValueError, match="unknown preset field"):
        main(["--preset", "smoke", "--out", str(tmp_path / "x"), "--set", "nope=1"])


@pytest.mark.parametrize(
    "item, message",
    [
        ("parallel=maybe", "parallel takes true or false"),
        ("steps_budget=lots", "steps_budget takes an int"),
        ("num_latent", "unknown preset field"),
        ("arch=rnn", "arch must be one of"),
    ],
)
def test_cli_bad_override_values_name_the_field(tmp_path, item, message):
    with pytest.raises(ValueError, match=message):
        main(["--preset", "smoke", "--out", str(tmp_path / "x"), "--set", item])
    assert not (tmp_path / "x").exists()  # rejected before any work


def test_warmup_must_leave_codi_steps(tmp_path):
    from dataclasses import replace

    with pytest.raises(ValueError, match="cot_warmup_steps"):
        run_demo(replace(PRESETS["smoke"], cot_warmup_steps=4), seed=0, out_dir=str(tmp_path), probe=False)


@pytest.mark.parametrize(
    "item, message",
    [
        ("num_latent=-1", "num_latent must be >= 0"),
        ("distill_loss_type=nope", "distill_loss_type must be one of"),
        ("n_embd=31", "n_embd a multiple of n_head"),
        ("eval_batch_size=0", "eval_batch_size=0 (must be >= 1)"),
        ("learning_rate=-1", "learning_rate=-1.0 (must be > 0)"),
    ],
)
def test_overwrite_with_an_invalid_value_keeps_the_folder(tmp_path, capsys, item, message):
    """Every value is checked before `--overwrite` deletes the earlier demo's folder."""
    from codi import cli

    out = fresh_out_dir(str(tmp_path / "earlier"), overwrite=False)
    (tmp_path / "earlier" / "results.json").write_text("{}")
    argv = ["demo", "--preset", "smoke", "--out", out, "--overwrite", "--no_probe", "--set", item]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert sorted(os.listdir(out)) == sorted([DEMO_MARKER, "results.json"])  # nothing deleted

"""The offline demo pipeline: tokenizer, base model, a very small end-to-end run (< 60 s)."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from codi.cli.demo import main
from codi.demo.pipeline import DEMO_MARKER, claim_check, fresh_out_dir, run_demo
from codi.demo.presets import PRESETS
from codi.offline_models import build_tokenizer
from codi.synth import SynthConfig, make_splits, to_icot_line


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
    for row in result["rows"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["n"] == PRESETS["smoke"].n_test
    assert result["rows"]["codi_cot"]["speedup_vs_cot"] == pytest.approx(1.0)
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved["claim"] == result["claim"] and saved["seed"] == 0
    assert (tmp_path / "demo" / "results.png").stat().st_size > 0
    # the trained models are saved HF-style, so `codi eval` / `codi probe` load them unchanged
    assert (tmp_path / "demo" / "codi" / "codi_config.json").is_file()
    assert (tmp_path / "demo" / "base" / "config.json").is_file()
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


def test_claim_check_uses_the_issue_thresholds():
    from codi.demo.pipeline import Row

    rows = {
        "no_cot": Row("n", "cot", 0.20, 6, 6, 100, 500),
        "codi_cot": Row("c", "cot", 0.90, 33, 33, 40, 500),
        "codi_latent": Row("l", "latent", 0.80, 6, 12, 90, 500),
    }
    assert all(claim_check(rows).values())
    rows["codi_latent"].accuracy = 0.70  # < 0.85 x 0.90
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

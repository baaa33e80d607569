"""Probing: record structure, no side effects on the model, the Table-3 metric on hand-made records,
the `codi probe` command end to end and the HTML report in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile

import pytest
import torch
from conftest import RECORDS, shared_file

from codi.analysis.probe import find_final_norm, probe
from codi.analysis.probe_metric import (
    PositionProbe,
    ProbeRecord,
    StepRef,
    TopK,
    first_pieces,
    match_steps,
    read_jsonl,
    reference_steps,
    summarize,
    token_matches,
)
from codi.cli import main as cli_main
from codi.report import write_report
from codi.testing import make_tokenizer

# --------------------------------------------------------------------------------------------------
# Probing a tiny model


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_record_structure(make_model, arch, tmp_path):
    model = make_model(arch, inf_latent_iterations=3)
    records = probe(
        model, RECORDS[:3], top_k=4, batch_size=2, after_projection=True, logit_lens=True, max_new_tokens=3
    )
    layers = model.hf_model.config.num_hidden_layers + 1
    assert [r.index for r in records] == [0, 1, 2]
    for record, raw in zip(records, RECORDS):
        assert record.question == raw.question and record.gold == raw.answer.split()[-1]
        assert [s.result for s in record.steps] == [
            e.rpartition("=")[2] for e in re.findall(r"<<(.*?)>>", raw.cot)
        ]
        assert len(record.positions) == 4 and [p.position for p in record.positions] == [0, 1, 2, 3]
        assert record.positions[0].label == "<bot>" and record.positions[3].label == "latent 3"
        for p in record.positions:
            assert len(p.top.tokens) == len(p.top.ids) == len(p.top.probs) == 4
            assert p.top.probs == sorted(p.top.probs, reverse=True) and 0 < p.top.probs[-1] <= 1
            assert p.top.tokens == [model.tokenizer.decode([i]) for i in p.top.ids]
            assert len(p.lens) == layers
            # transformers' last hidden_states entry is the normed last-layer state: lens == top there
            assert p.lens[-1].ids == p.top.ids
            assert p.hidden_norm > 0
        assert all(p.projected is not None and p.latent_norm > 0 for p in record.positions[:3])
        assert record.positions[3].projected is None and record.positions[3].latent_norm is None
        cosine = torch.tensor(record.latent_cosine)
        assert cosine.shape == (3, 3) and torch.allclose(cosine.diagonal(), torch.ones(3), atol=1e-4)
        assert isinstance(record.predicted_text, str) and isinstance(record.correct, bool)
    paths = write_report(records, summarize(records), str(tmp_path))
    assert read_jsonl(paths["records"]) == records  # JSONL round trip


def test_final_norm_found_generically(make_model):
    gpt2 = make_model("gpt2").hf_model
    assert find_final_norm(gpt2) is gpt2.transformer.ln_f
    llama = make_model("llama").hf_model
    assert find_final_norm(llama) is llama.model.norm


def test_probe_changes_no_weights_and_restores_mode(make_model):
    model = make_model("gpt2")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    model.train()
    probe(model, RECORDS[:2], top_k=3, num_latent=2, after_projection=True, logit_lens=True, max_new_tokens=2)
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert all(param.grad is None for param in model.parameters())


def test_probe_is_batch_invariant(make_model):
    model = make_model("llama")
    together = probe(model, RECORDS, top_k=5, batch_size=4, num_latent=2, predict=False)
    alone = probe(model, RECORDS[2:3], top_k=5, batch_size=1, num_latent=2, predict=False)[0]
    assert [p.top.ids for p in alone.positions] == [p.top.ids for p in together[2].positions]


# --------------------------------------------------------------------------------------------------
# The metric on hand-made records


def _record(steps: list[StepRef], tokens_per_position: list[list[str]], correct=None) -> ProbeRecord:
    positions = [
        PositionProbe(i, TopK(tokens, list(range(len(tokens))), [0.5] * len(tokens)))
        for i, tokens in enumerate(tokens_per_position)
    ]
    return ProbeRecord(question="q", positions=positions, steps=steps, correct=correct)


def _step(result: str, pieces: tuple[str, ...] = ()) -> StepRef:
    return StepRef(f"a=b={result}", result, list(pieces))


def test_reference_steps_parse_results():
    steps = reference_steps("<<600*30/100=180>> <<600*10/100=60>> <<180+60=240>>")
    assert [s.expression for s in steps] == ["600*30/100=180", "600*10/100=60", "180+60=240"]
    assert [s.result for s in steps] == ["180", "60", "240"]
    assert [s.result for s in reference_steps("<<1,200/2=600>> <<no equals>> <<3-8=-5>>")] == ["600", "-5"]
    assert reference_steps("She has 3 apples. She eats 1.") == []


@pytest.mark.shared_data
def test_reference_steps_of_the_validation_set():
    from codi.analysis.probe_metric import as_number, bucket
    from codi.data.dataset import read_records

    records = read_records(str(shared_file("gsm8k_aug_valid.txt")))
    steps = [reference_steps(record.cot) for record in records]
    assert all(as_number(step.result) is not None for record_steps in steps for step in record_steps)
    buckets = {bucket(len(record_steps)) for record_steps in steps}
    assert {"1", "2", "3+"} <= buckets


def test_first_pieces_of_multi_token_numbers():
    tokenizer = make_tokenizer("llama3")  # digits in groups of at most 3
    assert first_pieces(tokenizer, "1234567890") == ["123"]
    assert first_pieces(tokenizer, "-5") == []  # first token "-" holds no digit: no prefix rule


def test_token_matching_rules():
    assert token_matches(" 42", _step("42")) and token_matches("42", _step("42"), rule="whole")
    assert token_matches(".5", _step("0.5")) and token_matches("5.0", _step("5"))
    assert token_matches(" 1,200", _step("1200"))
    assert not token_matches(" 4", _step("42")) and not token_matches(" ", _step("42"))
    multi = _step("1800", ("18",))
    assert token_matches("18", multi) and not token_matches("18", multi, rule="whole")
    negative = _step("-5")
    assert (
        token_matches("-5", negative)
        and not token_matches("-", negative)
        and not token_matches("5", negative)
    )
    assert token_matches("x", StepRef("y=x", "x"))  # non-numeric results compare as text


def test_match_in_order_and_any_order():
    filler = ["a", "b"]
    one = _record([_step("42")], [filler, filler, [" 42", "a"], filler])
    assert match_steps(one) == (True, True)
    swapped = _record([_step("3"), _step("6")], [filler, ["6"], filler, ["3"]])
    assert match_steps(swapped) == (False, True)
    ordered = _record([_step("3"), _step("6")], [["3"], filler, ["6"], filler])
    assert match_steps(ordered) == (True, True)
    same_position = _record([_step("3"), _step("6")], [filler, ["3", "6"], filler, filler])
    assert match_steps(same_position) == (False, True)  # in order needs strictly increasing positions
    # step 1 matches at 0 and 2; step 2 only at 1: in order via position 0
    greedy = _record([_step("3"), _step("6")], [["3"], ["6"], ["3"], filler])
    assert match_steps(greedy) == (True, True)
    missing = _record([_step("1"), _step("2"), _step("3")], [["1"], ["2"], filler, filler])
    assert match_steps(missing) == (False, False)
    multi = _record([_step("1800", ("18",))], [filler, ["18"]])
    assert match_steps(multi) == (True, True) and match_steps(multi, rule="whole") == (False, False)
    assert match_steps(_record([], [filler])) == (False, False)
    projected = _record([_step("7")], [filler, filler])
    projected.positions[0].projected = TopK(["7"])
    assert match_steps(projected) == (False, False) and match_steps(projected, source="projected") == (
        True,
        True,
    )


def test_summarize_buckets_and_geometry():
    f = ["a"]
    records = [
        _record([_step("4")], [f, ["4"], f], correct=True),
        _record([_step("4")], [f, f, f], correct=False),
        _record([_step("3"), _step("6")], [f, ["6"], ["3"]], correct=True),
        _record([_step("1"), _step("2"), _step("3")], [["1"], ["2"], ["3"]]),
        _record([_step("1"), _step("2"), _step("3"), _step("1800", ("18",))], [["1"], ["2", "18"], ["3"]]),
        _record([], [f, f, f]),  # no equation steps: counted in the histogram only
    ]
    for record in records:
        record.latent_cosine = [[1.0, 0.5], [0.5, 1.0]]
        record.positions[0].latent_norm, record.positions[1].latent_norm = 2.0, 4.0
    summary = summarize(records)
    table = summary["table3"]["first_token"]
    assert table["1"] == {"n": 2, "in_order": 0.5, "any_order": 0.5}
    assert table["2"] == {"n": 1, "in_order": 0.0, "any_order": 1.0}
    assert table["3+"] == {"n": 2, "in_order": 0.5, "any_order": 1.0}  # "1800" only at an earlier position
    assert table["all"] == {"n": 5, "in_order": 0.4, "any_order": 0.8}
    assert summary["table3"]["whole"]["3+"] == {"n": 2, "in_order": 0.5, "any_order": 0.5}
    assert summary["steps_histogram"] == {"0": 1, "1": 2, "2": 1, "3+": 2}
    assert summary["accuracy"] == pytest.approx(2 / 3)
    assert summary["num_latent"] == 2 and summary["top1_prob_mean"] == [0.5, 0.5, 0.5]
    assert summary["latent_norm_mean"] == [2.0, 4.0]
    assert summary["latent_cosine_mean"] == [[1.0, 0.5], [0.5, 1.0]]
    assert "table3_after_projection" not in summary


# --------------------------------------------------------------------------------------------------
# Command line and report


def test_cli_probe_end_to_end(make_model, tmp_path, capsys):
    checkpoint = tmp_path / "ckpt"
    make_model("gpt2").save_pretrained(str(checkpoint))
    data = tmp_path / "icot.txt"
    data.write_text("".join(f"{r.question}||{r.cot} {r.answer}\n" for r in RECORDS))
    out = tmp_path / "out"
    argv = ["probe", "--model", str(checkpoint), "--data", str(data), "--limit", "3", "--top_k", "3",
            "--output_dir", str(out), "--logit_lens", "--after_projection", "--max_new_tokens", "4", "--num_latent", "2"]  # fmt: skip
    assert cli_main(argv) == 0
    assert "in order / any order" in capsys.readouterr().out
    lines = (out / "probe_records.jsonl").read_text().splitlines()
    assert len(lines) == 3 and len(json.loads(lines[0])["positions"]) == 3  # --num_latent 2
    summary = json.loads((out / "probe_summary.json").read_text())
    assert summary["num_questions"] == 3 and summary["top_k"] == 3 and "table3_after_projection" in summary
    for name in ("top1_heatmap.png", "match_rate.png", "latent_geometry.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count('class="question-row"') == 3 and "logit lens" in page
    assert not re.findall(r'(?:src|href)="(?!data:)', page)  # self-contained: no external assets


def _hand_made_report(tmp_path, count: int) -> str:
    records = [
        _record(
            [_step(str(i)), _step(str(2 * i))],
            [["a", f" {i}"], ["<b>&"], [str(2 * i), "c"]],
            correct=i % 2 == 0,
        )
        for i in range(1, count + 1)
    ]
    for index, record in enumerate(records):
        record.index, record.question, record.gold = (
            index,
            f"Question number {index} <script>x</script>?",
            "1",
        )
        record.latent_cosine = [[1.0, 0.2], [0.2, 1.0]]
    return write_report(records, summarize(records), str(tmp_path), title="hand-made")["html"]


def test_html_escapes_and_counts_rows(tmp_path):
    page = open(_hand_made_report(tmp_path, 4), encoding="utf-8").read()
    assert page.count('<tr class="question-row">') == 4
    assert "<script>" not in page and "&lt;b&gt;&amp;" in page
    assert page.count('class="tok hit"') == 8  # each record: " i" at position 0 and "2i" at position 2


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="chromium not on PATH (apt-get install chromium)"
)
def test_html_report_renders_in_headless_chromium(tmp_path):
    import matplotlib.image

    report = _hand_made_report(tmp_path, 5)
    flags = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [*flags, f"--user-data-dir={profile}", "--dump-dom", f"file://{report}"],
            capture_output=True, text=True, timeout=60, check=True,
        ).stdout  # fmt: skip
    assert len(re.findall(r'<tr class="question-row"', dom)) == 5
    screenshot = tmp_path / "screenshot.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [*flags, f"--user-data-dir={profile}", "--window-size=1200,1600", f"--screenshot={screenshot}",
             f"file://{report}"],
            capture_output=True, timeout=60, check=True,
        )  # fmt: skip
    pixels = matplotlib.image.imread(str(screenshot))
    assert pixels.shape[0] == 1600 and float(pixels[..., :3].std()) > 0.05  # rendered, not blank

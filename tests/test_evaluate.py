"""Evaluation: benchmark loaders (plain files and hub layout), answer extraction, `codi eval` end to end."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from codi import cli
from codi.config import CODIModelArguments
from codi.data.dataset import DataError
from codi.data.eval_data import EVAL_SETS, EvalItem, eval_set_spec, load_eval_set, parse_gold
from codi.inference.evaluate import (
    evaluate,
    extract_answer,
    extract_answer_strict,
    extract_choice,
    extract_choice_strict,
    is_correct,
)
from codi.model import CODIModel
from codi.report import eval_table
from codi.testing import save_tiny_model

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"shared data not found at {DATA_DIR}")
FOUR_SETS = ("gsm8k", "svamp", "gsm-hard", "multiarith")


# --------------------------------------------------------------------------------------------------
# Loaders on ../shared/data


@needs_data
@pytest.mark.shared_data
@pytest.mark.parametrize(
    "name, count", [("gsm8k", 1319), ("svamp", 1000), ("gsm-hard", 1319), ("multiarith", 600)]
)
def test_plain_file_counts(name, count):
    assert len(load_eval_set(name, str(DATA_DIR))) == count


@needs_data
@pytest.mark.shared_data
def test_gold_values_match_the_files():
    """Gold answers (and questions) read independently from the raw files, at several indices."""
    gsm8k = [json.loads(line) for line in open(DATA_DIR / "gsm8k_test.jsonl", encoding="utf-8")]
    svamp = json.load(open(DATA_DIR / "svamp.json", encoding="utf-8"))
    hard = [json.loads(line) for line in open(DATA_DIR / "gsm_hard.jsonl", encoding="utf-8")]
    arith = json.load(open(DATA_DIR / "multiarith.json", encoding="utf-8"))
    items = {name: load_eval_set(name, str(DATA_DIR)) for name in FOUR_SETS}
    assert items["gsm8k"][0].gold == 18.0 and items["svamp"][0].gold == 51.0
    assert items["gsm-hard"][0].gold == -9867630.0 and items["multiarith"][0].gold == 39.0
    for index in (0, 1, 57, 599):
        expected = float(gsm8k[index]["answer"].split("####")[-1].replace(",", ""))
        assert items["gsm8k"][index].gold == expected
        assert items["gsm8k"][index].question == gsm8k[index]["question"].strip().replace("  ", " ")
        assert items["svamp"][index].gold == float(svamp[index]["Answer"])
        body, question = svamp[index]["Body"], svamp[index]["Question"]
        assert items["svamp"][index].question == f"{body} {question}".strip().replace("  ", " ")
        assert items["gsm-hard"][index].gold == float(hard[index]["target"])
        assert items["multiarith"][index].gold == float(arith[index]["lSolutions"][0])
    # GSM-Hard keeps its non-integer targets
    assert any(item.gold != int(item.gold) for item in items["gsm-hard"])
    # GSM8k-Aug text file: same questions, gold after ####
    aug = load_eval_set("gsm8k-aug", str(DATA_DIR))
    assert len(aug) == 1319 and [item.gold for item in aug[:50]] == [
        item.gold for item in items["gsm8k"][:50]
    ]
    assert len(load_eval_set("gsm8k-aug-valid", str(DATA_DIR))) == 500


def test_limit_aliases_and_errors(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"question": " Q  one ", "answer": "x\\n#### 1,234"}\n{"question": "Q2", "answer": "#### -7"}\n'
    )
    items = load_eval_set("gsm8k", str(path))
    assert [(item.question, item.gold) for item in items] == [("Q one", 1234.0), ("Q2", -7.0)]
    assert len(load_eval_set("GSM8K-test", str(path), limit=1)) == 1
    assert eval_set_spec("gsm_hard").name == "gsm-hard" and eval_set_spec("multi-arith").name == "multiarith"
    with pytest.raises(ValueError, match="unknown evaluation set 'mmlu'"):
        load_eval_set("mmlu", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="svamp.json"):
        load_eval_set("svamp", str(tmp_path))
    path.write_text('{"text": "no question field"}\n')
    with pytest.raises(DataError, match="mine.jsonl:1.*question"):
        load_eval_set("gsm8k", str(path))
    assert parse_gold("#### 1,000") == 1000.0 and parse_gold(7) == 7.0 and parse_gold("n/a") is None


def test_hub_layouts(monkeypatch):
    """Hub rows (offline stand-in for datasets.load_dataset): field names and split concatenation."""
    import datasets

    rows = {
        ("gsm8k", "test"): [{"question": "Q", "answer": "steps\n#### 1,200"}],
        ("ChilleD/SVAMP", "train"): [
            {"Body": "B.", "Question": "Q?", "Answer": 3.0, "question_concat": "B. Q?"}
        ],
        ("ChilleD/SVAMP", "test"): [
            {"Body": "C.", "Question": "D?", "Answer": 4.0, "question_concat": "C. D?"}
        ],
        ("juyoung-trl/gsm-hard", "train"): [{"instruction": "H", "response": "2.5"}],
        ("ChilleD/MultiArith", "train"): [{"question": " M1 ", "final_ans": "5"}],
        ("ChilleD/MultiArith", "test"): [{"question": "M2", "final_ans": "6"}],
        ("zen-E/CommonsenseQA-GPT4omini", "validation"): [{"question": "C?", "cot": "c", "answer": "B"}],
    }
    calls = []

    def fake_load_dataset(path, *config, split):
        calls.append((path, config, split))
        return rows[(path, split)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert [(i.question, i.gold) for i in load_eval_set("gsm8k")] == [("Q", 1200.0)]
    assert calls[-1] == ("gsm8k", ("main",), "test")
    assert [(i.question, i.gold) for i in load_eval_set("svamp")] == [("B. Q?", 3.0), ("C. D?", 4.0)]
    assert [(i.question, i.gold) for i in load_eval_set("gsm-hard")] == [("H", 2.5)]
    assert [i.gold for i in load_eval_set("multiarith")] == [5.0, 6.0]
    assert [(i.question, i.gold) for i in load_eval_set("multiarith-test")] == [("M2", 6.0)]
    assert [i.gold for i in load_eval_set("commonsense")] == ["B"]
    assert EVAL_SETS["commonsense"].answer_kind == "choice"


# --------------------------------------------------------------------------------------------------
# Answer extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is: 1,234", 1234.0),
        ("He pays $1,200,000 in total", 1200000.0),
        ("The answer is: -5", -5.0),
        ("The answer is: 3.75", 3.75),
        ("The answer is: $18.", 18.0),
        ("The answer is: 18.", 18.0),
        ("<<600*30/100=180>> <<180+60=240>> The answer is: 240", 240.0),
        ("first 3 then 4 finally 5 apples", 5.0),
        ("The answer is: 7 dollars and 2", 2.0),  # the LAST number, as the reference
        ("no number here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is: 1,234", 1234.0),
        ("The answer is: $18.", 18.0),
        ("The answer is:-3.5", -3.5),
        ("The answer is: 7 dollars and 2", 7.0),
        ("The answer is: 1 The answer is: 9", 9.0),
        ("so 12", None),
        ("The answer is: many", None),
    ],
)
def test_extract_answer_strict(text, expected):
    assert extract_answer_strict(text) == expected


def test_choices_and_is_correct():
    assert extract_choice("reasoning. The answer is: B") == "B"
    assert extract_choice("The answer is: 3") is None  # a number: wrong, as the reference
    assert extract_choice("The answer is: maybe") == "C"  # the reference's fallback guess
    assert extract_choice("") == "C"
    assert extract_choice_strict("The answer is: E") == "E" and extract_choice_strict("E") is None
    assert is_correct(18.0, 18.0) and is_correct(0.1 + 0.2, 0.3) and is_correct("B", "B")
    assert not is_correct(None, 18.0) and not is_correct(18.0, None) and not is_correct(None, None)
    assert not is_correct(9867631.0, 9867630.0)  # no relative slack on large GSM-Hard values
    assert not is_correct(3.33, 10 / 3) and not is_correct(18.0, 1.8) and not is_correct(3.0, "C")


# --------------------------------------------------------------------------------------------------
# evaluate() and `codi eval`


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("eval")
    base = save_tiny_model(str(root / "base"), arch="gpt2")
    model = CODIModel.from_base(CODIModelArguments(model_name_or_path=base, lora_r=8, prj_dim=64))
    model.save_pretrained(str(root / "codi"))
    return str(root / "codi")


def test_evaluate_function(checkpoint, tmp_path):

    model = CODIModel.from_pretrained(checkpoint)
    items = [
        EvalItem("Tom has 12 apples.", 12.0),
        EvalItem("Hi", None),
        EvalItem("A shop sells 7 pens.", 7.0),
    ]
    result = evaluate(
        model,
        items,
        "latent",
        2,
        name="toy",
        max_new_tokens=6,
        num_runs=2,
        do_sample=True,
        output_dir=str(tmp_path),
    )
    assert result["n"] == 3 and result["num_runs"] == 2 and len(result["run_accuracies"]) == 2
    assert 0.0 <= result["accuracy"] <= 100.0 and result["accuracy_std"] >= 0.0
    assert 1 <= result["mean_generated_tokens"] <= 6 and result["mean_latent_positions"] == 6
    assert result["questions_per_s"] > 0 and result["wall_time_s"] > 0
    for run in range(2):
        lines = (tmp_path / f"toy_latent_run{run}.jsonl").read_text().splitlines()
        assert len(lines) == 3 and json.loads(lines[1])["correct"] is False  # no gold: wrong, no crash
    assert "toy" in eval_table([result], {"toy": 2.5}) and "2.50x" in eval_table([result], {"toy": 2.5})


@needs_data
@pytest.mark.shared_data
def test_codi_eval_end_to_end(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "--model", checkpoint, "--datasets", ",".join(FOUR_SETS), "--data_dir", str(DATA_DIR)]
    argv += ["--limit", "3", "--batch_size", "2", "--max_new_tokens", "12", "--output_dir", str(out)]
    assert cli.main(argv + ["--compare_cot", "--no_progress"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "results.json").read_text())
    assert [(r["dataset"], r["mode"]) for r in summary["results"]] == [
        (name, mode) for name in FOUR_SETS for mode in ("latent", "cot")
    ]
    assert set(summary["speedups_vs_cot"]) == set(FOUR_SETS)
    for name in FOUR_SETS:
        assert name in printed
        for mode in ("latent", "cot"):
            records = [json.loads(line) for line in (out / f"{name}_{mode}.jsonl").read_text().splitlines()]
            assert len(records) == 3
            assert set(records[0]) >= {"question", "gold", "prediction", "generated_text", "correct"}
            assert records[0]["gold"] == load_eval_set(name, str(DATA_DIR), limit=1)[0].gold
    assert (
        out / "results_table.txt"
    ).is_file() and "speedup of CODI (latent) over teacher-mode CoT" in printed


def test_codi_eval_errors(checkpoint, tmp_path, capsys):
    base = ["eval", "--model", checkpoint, "--output_dir", str(tmp_path / "o")]
    assert cli.main(base + ["--datasets", "gsm8k,nope", "--data_dir", str(tmp_path)]) == 2
    assert "unknown evaluation set 'nope'" in capsys.readouterr().err
    assert cli.main(base + ["--datasets", "svamp", "--data_dir", str(tmp_path)]) == 2
    assert "svamp.json" in capsys.readouterr().err
    assert (
        cli.main(
            ["eval", "--model", str(tmp_path / "missing"), "--datasets", "gsm8k", "--data_dir", str(tmp_path)]
        )
        == 2
    )
    assert not os.path.exists(tmp_path / "o" / "results.json")


def test_evaluate_feed_answer_prompt(checkpoint, tmp_path):
    """The answer prompt fed in one forward comes back as the start of every generated text."""
    model = CODIModel.from_pretrained(checkpoint)
    items = [EvalItem("Tom has 12 apples.", 12.0), EvalItem("A shop sells 7 pens.", 7.0)]
    evaluate(
        model,
        items,
        "latent",
        2,
        name="fed",
        max_new_tokens=8,
        feed_answer_prompt=True,
        output_dir=str(tmp_path),
    )
    texts = [
        json.loads(line)["generated_text"]
        for line in (tmp_path / "fed_latent.jsonl").read_text().splitlines()
    ]
    assert all(text.startswith(model.args.answer_prompt) for text in texts)


# --------------------------------------------------------------------------------------------------
# Robustness: questions the model cannot answer, failures in a multi-set run


@pytest.fixture(scope="module")
def short_model(tmp_path_factory) -> CODIModel:
    """A model with 40 positions: a 60-word question does not fit it."""
    base = save_tiny_model(str(tmp_path_factory.mktemp("short") / "base"), "gpt2", max_positions=40)
    return CODIModel.from_base(CODIModelArguments(model_name_or_path=base, lora_r=4, prj_dim=16)).eval()


def test_questions_that_do_not_fit_are_skipped_counted_and_named(short_model, tmp_path, caplog):
    items = [
        EvalItem("Tom has 12 apples.", 12.0, "toy.jsonl:1"),
        EvalItem("word " * 60, 3.0, "toy.jsonl:2"),
        EvalItem("A shop sells 7 pens.", 7.0, "toy.jsonl:3"),
    ]
    with caplog.at_level("WARNING", logger="codi.inference.evaluate"):
        result = evaluate(
            short_model, items, "latent", name="toy", max_new_tokens=4, output_dir=str(tmp_path)
        )
    assert result["n"] == 3 and result["skipped"] == 1 and result["skipped_items"] == ["toy.jsonl:2"]
    assert result["skipped_counted_as"] == "wrong"
    assert "toy (latent): 1 of 3 questions skipped and counted wrong: toy.jsonl:2" in caplog.text
    assert "does not fit" in caplog.text
    records = [json.loads(line) for line in (tmp_path / "toy_latent.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2] and records[1]["correct"] is False
    assert "does not fit" in records[1]["skipped"] and "skipped" not in records[0]
    assert (
        "skipped questions (too long for the model, or empty in CoT mode; counted wrong): toy latent 1"
        in eval_table([result])
    )
    # every question skipped: a result, not a crash
    alone = evaluate(short_model, items[1:2], "cot", name="toy", max_new_tokens=4)
    assert alone["accuracy"] == 0.0 and alone["skipped"] == 1 and alone["questions_per_s"] == 0.0


def test_bad_questions_are_one_line_errors_naming_the_index(short_model):
    from codi.inference.generate import generate, unfit_questions

    with pytest.raises(ValueError, match=r"^questions\[0\] is None, not a string$"):
        generate(short_model, [None])
    with pytest.raises(ValueError, match=r"questions\[1\] is empty: CoT mode needs"):
        generate(short_model, ["Hi", ""], mode="cot", max_new_tokens=2)
    assert (
        generate(short_model, [""], max_new_tokens=2)[0].num_latent_positions >= 0
    )  # latent: [bot] is enough
    with pytest.raises(ValueError, match=r"questions\[1\] does not fit.*\(and 1 more questions\)"):
        generate(short_model, ["Hi", "word " * 60, "word " * 70], max_new_tokens=2)
    assert sorted(unfit_questions(short_model, ["Hi", "", None], mode="cot")) == [1, 2]
    result = evaluate(
        short_model, [EvalItem("", 1.0, "e:1"), EvalItem("Hi", 2.0, "e:2")], "cot", max_new_tokens=2
    )
    assert result["skipped_items"] == ["e:1"]


def test_a_failing_set_keeps_the_results_of_the_sets_done(checkpoint, tmp_path):
    from codi.data.eval_data import eval_set_spec
    from codi.inference.evaluate import evaluate_sets

    model = CODIModel.from_pretrained(checkpoint)
    done = [EvalItem("Tom has 12 apples.", 12.0, "a:1"), EvalItem("Hi", 2.0, "a:2")]
    sets = [(eval_set_spec("gsm8k"), done), (eval_set_spec("svamp"), done), (eval_set_spec("multiarith"), [])]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="multiarith: no items"):
        evaluate_sets(
            model,
            sets,
            modes=("latent", "cot"),
            output_dir=str(out),
            summary={"model": "m"},
            max_new_tokens=3,
        )
    summary = json.loads((out / "results.json").read_text())
    assert [(r["dataset"], r["mode"]) for r in summary["results"]] == [
        (name, mode) for name in ("gsm8k", "svamp") for mode in ("latent", "cot")
    ]
    assert summary["failed"]["dataset"] == "multiarith" and "no items" in summary["failed"]["error"]
    assert summary["model"] == "m" and set(summary["speedups_vs_cot"]) == {"gsm8k", "svamp"}
    assert "svamp" in (out / "results_table.txt").read_text()
    ok = evaluate_sets(model, sets[:1], output_dir=str(tmp_path / "ok"), max_new_tokens=3)
    assert "failed" not in ok and len(ok["results"]) == 1 and "gsm8k" in ok["table"]

"""One scoring rule: `codi.inference.scoring` decides correctness for `codi eval`, the demo's table, the probe and
the benchmarks, so that they agree on the same outputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from codi.analysis import probe as probe_module
from codi.compare import Budget, evaluate_mode
from codi.data.eval_data import EvalItem
from codi.inference import evaluate as evaluate_module
from codi.inference import scoring
from codi.inference.evaluate import evaluate
from codi.inference.generate import generate
from codi.inference.scoring import (
    extract_answer,
    is_correct,
    majority_vote,
    parse_gold,
    pass_at_k,
    sample_metrics,
)

REPO = Path(__file__).resolve().parents[1]

# Questions on which the tiny random GPT-2 of the fixtures answers with and without numbers (CoT mode:
# " 21 21..." and " 42 42 ..."), so that golds chosen from its outputs give right and wrong verdicts.
QUESTIONS = [
    "Tom has 12 apples and buys 30 more.",
    "A shop sells 7 pens for 3 dollars each.",
    "The answer is: 21",
    "Hi 100 42",
    "She eats three. How many left?",
]


def test_evaluate_reexports_the_one_rule():
    for name in (
        "extract_answer",
        "extract_answer_strict",
        "extract_choice",
        "extract_choice_strict",
        "is_correct",
    ):
        assert getattr(evaluate_module, name) is getattr(scoring, name)
    from codi.data import eval_data

    assert eval_data.parse_gold is scoring.parse_gold


def test_tolerance_is_the_same_everywhere():
    """42.00005 is right under the rule (1e-4 absolute); the demo and the probe used 1e-6 and the answer
    benchmark exact `==`: all now agree with `is_correct`."""
    assert is_correct(42.00005, 42.0) and not is_correct(42.0002, 42.0)
    bench = _load_bench()
    for text, gold in [("The answer is: 42.00005", "42"), ("The answer is: 42.0002", "42"), ("none", "42")]:
        expected = is_correct(extract_answer(text), parse_gold(gold))
        assert bench.correct(text, gold) is expected
    assert bench.correct("The answer is: 1,200", "#### 1,200")


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_answer_prompt", REPO / "bench" / "answer_prompt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_majority_vote_and_pass_at_k():
    assert majority_vote([1.0, 2.0, 2.0, None]) == 2.0
    assert majority_vote([None, None]) is None and majority_vote([]) is None
    assert majority_vote([3.0, 4.0]) == 3.0  # a tie goes to the first value seen
    assert majority_vote([5.0, 7.0, 5.00001, 7.0 + 1e-9]) == 5.0  # equal by is_correct: one group each
    assert majority_vote(["B", "C", "C"]) == "C"
    assert (
        pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 5, 3) == 1.0 and pass_at_k(5, 1, 1) == pytest.approx(0.2)
    )
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(3, 1, 4)
    verdicts = [[True, False, False], [False, False, False], [True, True, False]]
    metrics = sample_metrics(verdicts, [False, False, True])
    assert metrics["pass_at_k"] == pytest.approx(200 / 3) and metrics["majority_accuracy"] == pytest.approx(
        100 / 3
    )
    assert metrics["pass_at_1"] == pytest.approx(100 * (1 / 3 + 0 + 2 / 3) / 3)
    assert (
        metrics["pass_at_k"] >= metrics["majority_accuracy"] and metrics["pass_at_k"] >= metrics["pass_at_1"]
    )


def _golds(model, mode: str) -> tuple[list[str], list[bool]]:
    """Gold answers chosen from the model's own greedy outputs: right (the prediction, or within the
    tolerance), and wrong (prediction + 1, or any number when the output has none). Written as plain
    decimals: the probe reads golds with `codi.inference.scoring.as_number`, which takes no exponent."""
    outputs = generate(model, QUESTIONS, mode=mode, max_new_tokens=64)
    golds, expected = [], []
    for index, output in enumerate(outputs):
        predicted = extract_answer(output.text)
        if predicted is None:
            golds.append("#### 5")
            expected.append(False)
        elif index % 2 == 0:  # right; off by 5e-5, right by the 1e-4 rule (the demo's old 1e-6 said no)
            golds.append(f"#### {predicted + (5e-5 if abs(predicted) < 1e6 else 0):.6f}")
            expected.append(True)
        else:
            golds.append(f"#### {predicted + 1:.6f}")
            expected.append(abs(predicted) >= 1e16)  # + 1 is lost in a huge float: still right
    return golds, expected


def test_demo_table_probe_and_codi_eval_agree(make_model, tmp_path):
    """The accuracy of the demo's and compare's harness (`evaluate_mode`), `codi eval`'s (`evaluate`) and
    the probe's verdicts on the same checkpoint and questions are equal, with at least one right and one
    wrong answer."""
    model = make_model("gpt2")
    seen = set()
    for mode in ("cot", "latent"):
        golds, expected = _golds(model, mode)
        seen.update(expected)
        records = [{"question": q, "answer": g} for q, g in zip(QUESTIONS, golds)]
        items = [EvalItem(q, parse_gold(g), f"toy:{i + 1}") for i, (q, g) in enumerate(zip(QUESTIONS, golds))]
        harness = evaluate_mode(model, items, mode, Budget(eval_batch_size=250, max_new_tokens=64), "check")
        result = evaluate(
            model, items, mode, max_new_tokens=64, warmup=False, name="toy", output_dir=str(tmp_path)
        )
        assert harness["accuracy"] == pytest.approx(result["accuracy"])
        assert result["accuracy"] == pytest.approx(100 * sum(expected) / len(expected))
        if mode == "latent":  # the probe answers greedily in latent mode
            probed = probe_module.probe(model, records, max_new_tokens=64)
            assert [record.correct for record in probed] == expected
    assert seen == {True, False}

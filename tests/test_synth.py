"""Synthetic GSM8k-Aug-style data: format, split disjointness, every CoT evaluates to its answer."""

from __future__ import annotations

import json
import re

import pytest

from codi.cli import main
from codi.data.dataset import read_records
from codi.data.synth import SynthConfig, check_cot, make_splits

STEP = re.compile(r"^<<[\d+\-*/%()]+=\d+>>$")


@pytest.mark.parametrize(
    "config",
    [
        SynthConfig(n_train=300, n_validation=50, n_test=100, seed=1),
        SynthConfig(n_train=300, n_validation=50, n_test=100, wording="fixed", train_min_steps=1, seed=2),
        SynthConfig(
            n_train=300, n_validation=50, n_test=100, modulus=None, operators="+-*/", min_steps=2, max_steps=4
        ),
    ],
    ids=["mod10", "fixed-mixed", "plain-arithmetic"],
)
def test_format_answers_and_disjoint_splits(config):
    splits = make_splits(config)
    assert {name: len(records) for name, records in splits.items()} == {
        "train": 300,
        "validation": 50,
        "test": 100,
    }
    for name, records in splits.items():
        for record in records:
            steps = record["cot"].split(" ")
            assert all(STEP.match(step) for step in steps), record["cot"]
            low = config.min_steps if name != "train" else (config.train_min_steps or config.min_steps)
            assert low <= len(steps) <= config.max_steps
            assert re.fullmatch(r"#### -?\d+", record["answer"])
            # every CoT evaluates, step by step and as a chain, to the stated answer
            assert check_cot(record["cot"]) == int(record["answer"][5:])
            assert "||" not in record["question"] and "####" not in record["question"]
    questions = {name: {r["question"] for r in records} for name, records in splits.items()}
    assert not questions["train"] & questions["test"]
    assert not questions["train"] & questions["validation"]
    assert not questions["validation"] & questions["test"]


def test_disjoint_by_underlying_problem_not_only_wording():
    splits = make_splits(SynthConfig(n_train=500, n_validation=100, n_test=200, seed=3))

    # the full CoT determines the start value and the operations, whatever the names and phrasing
    keys = {name: {r["cot"] for r in records} for name, records in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["validation"] & keys["test"]


def test_seeded_and_seed_sensitive():
    config = SynthConfig(n_train=50, n_validation=10, n_test=10, seed=7)
    assert make_splits(config) == make_splits(config)
    assert make_splits(config) != make_splits(SynthConfig(n_train=50, n_validation=10, n_test=10, seed=8))


def test_check_cot_rejects_wrong_steps():
    assert check_cot("<<(3+4)%10=7>> <<(7*2)%10=4>>") == 4
    with pytest.raises(ValueError, match="evaluates to"):
        check_cot("<<(3+4)%10=8>>")
    with pytest.raises(ValueError, match="previous result"):
        check_cot("<<(3+4)%10=7>> <<(6*2)%10=2>>")
    with pytest.raises(ValueError, match="malformed"):
        check_cot("<<3+4=7>><<7*2=14>>")


def test_too_small_problem_space_is_an_error():
    with pytest.raises(ValueError, match="distinct problems"):
        make_splits(SynthConfig(n_train=5000, n_validation=10, n_test=10, min_steps=1, max_steps=1))


def test_invertible_draws_only_multipliers_coprime_with_the_modulus():
    config = SynthConfig(n_train=500, n_validation=0, n_test=0, wording="fixed", invertible=True, seed=3)
    multipliers = [
        int(k)
        for record in make_splits(config)["train"]
        for k in re.findall(r"multiply by (\d+)", record["question"])
    ]
    assert multipliers and set(multipliers) == {3, 7, 9}
    for record in make_splits(config)["train"]:
        assert f"#### {check_cot(record['cot'])}" == record["answer"]
    with pytest.raises(ValueError, match="invertible needs a modulus"):
        SynthConfig(modulus=None, invertible=True)
    # No operator can be drawn: an error, not an endless retry loop.
    with pytest.raises(ValueError, match="no valid operand"):
        SynthConfig(operators="*", operand_max=2, invertible=True)
    with pytest.raises(ValueError, match="no valid operand"):
        SynthConfig(operators="/")


def test_invalid_config():
    with pytest.raises(ValueError, match="operators"):
        SynthConfig(operators="+^")
    with pytest.raises(ValueError, match="min_steps"):
        SynthConfig(min_steps=3, max_steps=2)


def test_cli_writes_files_the_trainer_reads(tmp_path):
    out = tmp_path / "synth"
    rc = main(["data", "synth", "--out", str(out), "--n_train", "40", "--n_validation", "5", "--n_test", "8"])
    assert rc == 0
    records = read_records(str(out / "train.txt"))
    assert len(records) == 40 and all(r.cot.startswith("<<") for r in records)
    jsonl = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert len(jsonl) == 8 and set(jsonl[0]) == {"question", "cot", "answer"}
    assert json.loads((out / "synth_config.json").read_text())["sizes"]["validation"] == 5
    assert main(["data"]) == 2


def test_uniform_wording_puts_every_step_at_the_same_word_position():
    config = SynthConfig(n_train=200, n_validation=0, n_test=0, wording="uniform", operators="+-*", seed=4)
    questions = [record["question"] for record in make_splits(config)["train"]]
    assert len({len(question.split()) for question in questions}) == 1
    first = questions[0].split()
    ordinals = [i for i, word in enumerate(first) if word.rstrip(",") in ("First", "Second", "Third")]
    for question in questions:
        words = question.split()
        assert [words[i].rstrip(",") for i in ordinals] == ["First", "Second", "Third"]
        assert all(words[i + 1] in ("plus", "minus", "times") for i in ordinals), question
    with pytest.raises(ValueError, match="wording must be one of"):
        SynthConfig(wording="terse")

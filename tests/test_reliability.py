"""Bad input and faults: each case ends in a clear error, a counted skip or a refusal (docs/reliability.md)."""

from __future__ import annotations

import logging

import pytest
from conftest import RECORDS

from codi.data import build_dataset
from codi.records import DataError, RawRecord


def _build(model, records, **kwargs):
    return build_dataset(records, model.tokenizer, bot_id=model.bot_id, eot_id=model.eot_id, **kwargs)


def test_non_numeric_answers_are_kept_counted_and_logged(make_model, caplog):
    model = make_model("gpt2")
    records = [
        *RECORDS[:2],
        RawRecord("How many apples?", "<<3+4=7>>", "#### 7 apples", "f.txt:3"),
        RawRecord("How many?", "<<3+4=7>>", "#### seven", "f.txt:4"),
        RawRecord("Is it?", "<<1+0=1>>", "True", "f.jsonl:5"),
    ]
    with caplog.at_level(logging.WARNING, logger="codi.data"):
        dataset, stats = _build(model, records)
    assert stats.kept == 5 and len(dataset) == 5  # kept: right for non-math tasks
    assert stats.flagged["non_numeric_answer"] == 3  # "7 apples" -> its last token "apples"; "seven"; "True"
    assert "f.txt:3" in stats.first_flagged["non_numeric_answer"]
    assert "non_numeric_answer" in caplog.text and "f.txt:3" in caplog.text


def test_commonsense_letters_are_not_flagged(make_model):
    model = make_model("gpt2")
    records = [RawRecord("Which one? A) x B) y", "Because.", "B", "c.jsonl:1")]
    _, stats = _build(model, records, cot_style="commonsense")
    assert not stats.flagged


def test_records_longer_than_the_model_positions_are_dropped_and_counted(make_model):
    model = make_model("gpt2")
    long_question = " ".join(["Tom has 12 apples and buys 30 more."] * 12)
    records = [*RECORDS, RawRecord(long_question, "<<12+30=42>>", "#### 42", "long.txt:9")]
    fitting, _ = _build(model, RECORDS, num_latent=3)
    limit = max(len(e.student_input_ids) + 3 + len(e.decoder_input_ids) for e in fitting.examples)
    limit = max(limit, *(len(e.teacher_input_ids) for e in fitting.examples))
    dataset, stats = _build(model, records, position_limit=limit, num_latent=3)
    assert stats.dropped["longer_than_model_positions"] == 1
    assert stats.first_dropped["longer_than_model_positions"] == "long.txt:9"
    assert len(dataset) == len(RECORDS)
    # the student sequence counts its latents: with many latents it is the longer one
    example = dataset.examples[0]
    teacher = len(example.teacher_input_ids)
    student = len(example.student_input_ids) + 50 + len(example.decoder_input_ids)
    assert student > teacher
    _, stats = _build(model, RECORDS[:2], position_limit=student, num_latent=50)
    assert stats.kept >= 1
    with pytest.raises(DataError, match="no usable records.*longer_than_model_positions"):
        _build(model, RECORDS[:1], position_limit=student - 1, num_latent=50)

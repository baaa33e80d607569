"""codi.data.dataset: loaders, the reference preprocessing (docs/method.md#preprocessing), distillation positions, collation."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import RECORDS, shared_file

from codi.data.dataset import (
    IGNORE_INDEX,
    CODICollator,
    answer_value,
    build_dataset,
    build_example,
    encode_answer,
    process_cot,
    step_value_token_ids,
)
from codi.data.records import (
    DataError,
    RawRecord,
    gsm8k_to_record,
    load_records,
    parse_icot_line,
    read_records,
)
from codi.io.hf import add_special_tokens
from codi.testing import make_tokenizer


@pytest.fixture(scope="module")
def tokenizers():
    """GPT-2-style (space glued to the number) and Llama-3-style (separate space token) tokenizers,
    with <pad>/<bot>/<eot> added as the model adds them."""
    out = {}
    for style in ("gpt2", "llama3"):
        tokenizer = make_tokenizer(style)
        pad, bot, eot = add_special_tokens(tokenizer)
        out[style] = (tokenizer, bot, eot)
    return out


def _build(tokenizers, style, records, **kwargs):
    tokenizer, bot, eot = tokenizers[style]
    return build_dataset(records, tokenizer, bot_id=bot, eot_id=eot, **kwargs)


# --------------------------------------------------------------------------------------------------
# Reference preprocessing


def test_equation_cot_drops_the_last_step_unless_asked():
    cot = "<<600*30/100=180>> <<600*10/100=60>> <<180+60=240>>"
    assert process_cot(cot, "equation") == "<<600*30/100=180>> <<600*10/100=60>>"
    assert process_cot(cot, "equation", include_last_cot=True) == cot
    assert process_cot(cot, "auto") == "<<600*30/100=180>> <<600*10/100=60>>"  # '<<' -> equation
    assert process_cot("<<1+1=2>>", "equation") == ""


def test_nl_cot_splits_on_period_space_and_ends_with_period_newline():
    cot = "He buys 3 apples. Each costs 2 dollars. So he pays 6 dollars."
    assert process_cot(cot, "nl") == "He buys 3 apples. Each costs 2 dollars.\n"
    assert process_cot(cot, "auto") == "He buys 3 apples. Each costs 2 dollars.\n"
    # kept last step: rejoined, plus the '.\n' the reference always appends
    assert process_cot(cot, "nl", include_last_cot=True) == cot + ".\n"
    assert process_cot("Only one sentence.", "nl") == ""  # nothing remains -> empty CoT


@pytest.mark.parametrize(
    ("answer", "value"),
    [("#### 360", "360"), ("360", "360"), ("The total is #### -5", "-5"), ("####1,234", "1,234"), ("", "")],
)
def test_answer_value_is_the_last_token_without_hashes(answer, value):
    assert answer_value(answer) == value


def test_icot_line_parsing():
    record = parse_icot_line("Q? 3 + 4||<<3+4=7>> <<7*2=14>> #### 14", "f.txt:1")
    assert (record.question, record.cot, record.answer, record.where) == (
        "Q? 3 + 4",
        "<<3+4=7>> <<7*2=14>>",
        "14",
        "f.txt:1",
    )


def test_gsm8k_solution_becomes_equation_cot():
    solution = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72"
    )
    record = gsm8k_to_record("How many?", solution, "x:1")
    assert record.cot == "<<48/2=24>> <<48+24=72>>"
    assert record.answer == "72"
    with pytest.raises(DataError, match="x:2: GSM8k answer has no '#### N'"):
        gsm8k_to_record("How many?", "no final line", "x:2")


def test_jsonl_loader_reads_both_schemas(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"question": "A?", "cot": "<<1+1=2>> <<2+1=3>>", "answer": "#### 3"},
        {"question": "B?", "answer": "She has <<2*3=6>>6.\n#### 6"},  # original GSM8k
    ]
    rows.append({"question": "C?", "steps": ["<<2*3=6>>", "<<6+1=7>>"], "answer": "7"})  # whynlp/gsm8k-aug
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    first, second, third = read_records(str(path))
    assert (first.cot, first.answer, first.where) == ("<<1+1=2>> <<2+1=3>>", "#### 3", f"{path}:1")
    assert (second.cot, second.answer) == ("<<2*3=6>>", "6")
    assert (third.cot, third.answer) == ("<<2*3=6>> <<6+1=7>>", "7")
    assert process_cot(third.cot) == "<<2*3=6>>"


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.txt", "Q||<<1+1=2>> #### 2\nno separator here\n", "bad.txt:2: expected 'question||cot"),
        ("bad2.txt", "Q||<<1+1=2>> #### 2\n\nQ2||<<1+1=2>> 2\n", "bad2.txt:3: expected '#### answer'"),
        (
            "bad.jsonl",
            '{"question": "Q", "cot": "c", "answer": "1"}\n{"question": \n',
            "bad.jsonl:2: invalid JSON",
        ),
        ("miss.jsonl", '{"question": "Q", "cot": "c"}\n', "miss.jsonl:1: missing field"),
        ("bad.json", '{"question": "Q"}', "bad.json: expected a JSON array"),
        ("data.csv", "question,cot,answer\n", "unknown data format"),
    ],
)
def test_malformed_input_names_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message.replace("|", "\\|").replace("(", "\\(")):
        read_records(str(path))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_records(str(tmp_path / "nope.txt"))


def test_hub_datasets_and_reference_aliases(monkeypatch):
    """The hub path, offline: `datasets.load_dataset` is replaced by an in-memory table."""
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        rows = [
            {"question": "Q1", "cot": "<<1+1=2>> <<2+2=4>>", "answer": "4"},
            {"question": "Q2", "steps": ["<<3*3=9>>"], "answer": "9"},
        ]
        return datasets.Dataset.from_list([rows[0]] if name == "zen-E/GSM8k-Aug" else [rows[1]])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    (record,) = load_records("icot")
    assert (record.question, record.cot, record.where) == (
        "Q1",
        "<<1+1=2>> <<2+2=4>>",
        "zen-E/GSM8k-Aug[train][0]",
    )
    (record,) = load_records("whynlp/gsm8k-aug", split="validation")
    assert (record.cot, record.answer) == ("<<3*3=9>>", "9")
    assert calls == [("zen-E/GSM8k-Aug", "train"), ("whynlp/gsm8k-aug", "validation")]


def test_shared_icot_and_gsm8k_files_load():
    records = read_records(str(shared_file("gsm8k_aug_valid.txt")))
    assert len(records) == 500 and all(r.question and r.answer for r in records)
    gsm = read_records(str(shared_file("gsm8k_test.jsonl")))
    assert len(gsm) == 1319
    assert gsm[0].cot.startswith("<<") and gsm[0].cot.endswith(">>")
    assert gsm[0].answer.replace(",", "").lstrip("-").replace(".", "").isdigit()


# --------------------------------------------------------------------------------------------------
# Dataset building: drops are counted by reason


def test_negative_answers_kept_by_default_and_skipped_on_request(tokenizers):
    dataset, stats = _build(tokenizers, "gpt2", RECORDS)
    assert stats.kept == 4 and not stats.dropped
    value_ids = [ex.answer_ids[ex.answer_value_index :] for ex in dataset.examples]
    tokenizer = tokenizers["gpt2"][0]
    assert tokenizer.decode(value_ids[2]).strip() == "-5"

    dataset, stats = _build(tokenizers, "gpt2", RECORDS, skip_negative_answers=True)
    assert stats.kept == 3 and dict(stats.dropped) == {"answer_not_starting_with_digit": 1}


def test_max_token_num_drops_are_counted(tokenizers, caplog):
    # The reference measures the raw fields: question + whole CoT + answer as read, special tokens in.
    tokenizer = tokenizers["gpt2"][0]
    sizes = [len(tokenizer(r.question + r.cot + r.answer)["input_ids"]) for r in RECORDS]
    limit = sorted(sizes)[1]  # keeps exactly the two shortest
    with caplog.at_level("INFO", logger="codi.data.dataset"):
        _, stats = _build(tokenizers, "gpt2", RECORDS, max_token_num=limit, name="tiny")
    assert stats.kept == 2 and dict(stats.dropped) == {"longer_than_max_token_num": 2}
    assert "tiny: read 4 records, kept 2, dropped longer_than_max_token_num: 2" in caplog.text
    # The same records survive whatever the method, so baselines train on the same data.
    _, no_cot = _build(tokenizers, "gpt2", RECORDS, max_token_num=limit, method="no_cot_sft")
    assert no_cot.kept == 2


def test_empty_answers_are_counted_and_all_dropped_is_an_error(tokenizers):
    records = [RawRecord("Q?", "<<1+1=2>>", "####", "f:1")]
    with pytest.raises(DataError, match="no usable records.*empty_answer"):
        _build(tokenizers, "gpt2", records)


def test_null_answers_are_dropped_and_counted(tmp_path, tokenizers):
    """GSM8k-Aug-NL has records whose answer is null; the reference skips them."""
    path = tmp_path / "nl.jsonl"
    rows = [
        {"question": "A?", "cot": "One. Two. Three.", "answer": None},
        {"question": "B?", "cot": "He has 2. He buys 1. So 3.", "answer": "3"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _, stats = _build(tokenizers, "gpt2", read_records(str(path)))
    assert stats.kept == 1 and dict(stats.dropped) == {"empty_answer": 1}


def test_max_samples_stops_after_that_many_kept(tokenizers):
    _, stats = _build(tokenizers, "gpt2", RECORDS, max_samples=2)
    assert stats.kept == 2 and stats.read == 2


def test_commonsense_style_keeps_the_whole_cot(tokenizers):
    record = RawRecord(" Which one?\nA. x B. y ", " It is x. Because y is wrong. ", "A", "c:1")
    dataset, _ = _build(tokenizers, "gpt2", [record], cot_style="commonsense")
    (example,) = dataset.examples
    tokenizer = tokenizers["gpt2"][0]
    assert tokenizer.decode(example.question_ids) == "Which one?\nA. x B. y\n"
    assert tokenizer.decode(example.cot_ids) == "It is x. Because y is wrong.\n"
    assert tokenizer.decode(example.answer_ids) == "The answer is: A"


# --------------------------------------------------------------------------------------------------
# Sequences and distillation positions


def _reference_position(tokenizer, ids, add_one):
    """The reference's rule: find the ids of 'The answer is:' and take its last token (+1 for Llama)."""
    prompt = tokenizer("The answer is:", add_special_tokens=False)["input_ids"]
    for start in range(len(ids) - len(prompt) + 1):
        if ids[start : start + len(prompt)] == prompt:
            return start + len(prompt) - 1 + add_one
    raise AssertionError("prompt not found")


@pytest.mark.parametrize(("style", "position_token"), [("gpt2", ":"), ("llama3", " ")])
def test_distillation_position_for_both_tokenizer_styles(tokenizers, style, position_token):
    tokenizer, bot, eot = tokenizers[style]
    example = build_example(tokenizer, "Q 12 + 30?", "<<12+30=42>>", "42", bot_id=bot, eot_id=eot)
    words = [tokenizer.decode([i]) for i in example.answer_ids]
    if style == "llama3":
        assert words[-2:] == [" ", "42"]  # the tokenizer really emits a separate space token
    else:
        assert words[-1] == " 42"
    teacher, decoder = example.teacher_input_ids, example.decoder_input_ids
    assert tokenizer.decode([teacher[example.teacher_distill_pos]]) == position_token
    assert tokenizer.decode([decoder[example.decoder_distill_pos]]) == position_token
    # the NEXT token is the first token of the value, in both views
    first_value = example.answer_ids[example.answer_value_index]
    assert teacher[example.teacher_distill_pos + 1] == first_value
    assert decoder[example.decoder_distill_pos + 1] == first_value
    assert tokenizer.decode([first_value]).strip() == "42"
    add_one = 1 if style == "llama3" else 0
    assert example.teacher_distill_pos == _reference_position(tokenizer, teacher, add_one)
    assert example.decoder_distill_pos == _reference_position(tokenizer, decoder, add_one)


@pytest.mark.parametrize("style", ["gpt2", "llama3"])
def test_distillation_position_for_a_negative_value(tokenizers, style):
    tokenizer, _, _ = tokenizers[style]
    ids, index = encode_answer(tokenizer, "-5")
    assert tokenizer.decode(ids[index:]).strip() == "-5"
    assert tokenizer.decode(ids[:index]).rstrip() == "The answer is:"


def test_missing_answer_value_is_a_clear_error(tokenizers):
    tokenizer = tokenizers["gpt2"][0]
    with pytest.raises(ValueError, match="cannot locate the answer value '' after the prompt"):
        encode_answer(tokenizer, "")


def test_teacher_and_student_views(tokenizers):
    tokenizer, bot, eot = tokenizers["llama3"]
    eos = tokenizer.eos_token_id
    ex = build_example(tokenizer, "Q?", "<<1+1=2>>", "2", bot_id=bot, eot_id=eot)
    q, c, a = len(ex.question_ids), len(ex.cot_ids), len(ex.answer_ids)
    assert ex.teacher_input_ids == ex.question_ids + ex.cot_ids + ex.answer_ids + [eos]
    assert ex.teacher_labels == [IGNORE_INDEX] * q + ex.cot_ids + ex.answer_ids + [eos]
    assert ex.student_input_ids == ex.question_ids + [bot]
    assert ex.decoder_input_ids == [eot] + ex.answer_ids + [eos]
    assert len(ex.teacher_input_ids) == q + c + a + 1

    sft = build_example(tokenizer, "Q?", "<<1+1=2>>", "2", bot_id=None, eot_id=None, method="cot_sft")
    assert sft.student_input_ids == [] and "student_input_ids" not in sft.as_features("cot_sft")
    no_cot = build_example(tokenizer, "Q?", "<<1+1=2>>", "2", bot_id=None, eot_id=None, method="no_cot_sft")
    assert no_cot.cot_ids == [] and no_cot.teacher_input_ids == ex.question_ids + ex.answer_ids + [eos]
    with pytest.raises(ValueError, match="needs the <bot> and <eot>"):
        build_example(tokenizer, "Q?", "c", "2", bot_id=None, eot_id=None)


def test_collator_pads_students_left_and_the_rest_right(tokenizers):
    tokenizer, _, _ = tokenizers["gpt2"]
    dataset, _ = _build(tokenizers, "gpt2", RECORDS[:2])
    pad = tokenizer.pad_token_id
    batch = CODICollator(pad)([dataset[0], dataset[1]])
    short, longer = dataset.examples
    n_student = len(longer.student_input_ids) - len(short.student_input_ids)
    assert n_student > 0
    assert batch["student_input_ids"][0, :n_student].tolist() == [pad] * n_student
    assert batch["student_input_ids"][0, n_student:].tolist() == short.student_input_ids
    assert batch["student_attention_mask"][0].tolist() == [0] * n_student + [1] * len(short.student_input_ids)
    assert batch["teacher_input_ids"][0, : len(short.teacher_input_ids)].tolist() == short.teacher_input_ids
    assert (batch["teacher_labels"][0, len(short.teacher_input_ids) :] == IGNORE_INDEX).all()
    assert batch["decoder_labels"][0, : len(short.decoder_input_ids)].tolist() == short.decoder_input_ids
    assert batch["teacher_distill_pos"].tolist() == [short.teacher_distill_pos, longer.teacher_distill_pos]
    assert batch["decoder_distill_pos"].dtype == torch.long


# --------------------------------------------------------------------------------------------------
# Optional latent step supervision targets


@pytest.mark.parametrize("style", ["gpt2", "llama3"])
def test_step_values_are_the_first_token_of_every_step_result_in_context(tokenizers, style):
    tokenizer, _, _ = tokenizers[style]
    cot = "<<600*30/100=180>> <<600*10/100=60>> <<180+60=240>> <<3-8=-5>>"
    ids = step_value_token_ids(tokenizer, cot)
    assert len(ids) == 4  # the last step too: the student must reach it although the teacher drops it
    for token_id, value in zip(ids, ["180", "60", "240", "-5"]):
        piece = tokenizer.decode([token_id]).strip()
        assert piece and value.startswith(piece), (piece, value)
    assert step_value_token_ids(tokenizer, "Half of 10 is 5. So 5 are left.") == []


def test_step_targets_only_when_asked_and_collated_with_ignore_padding(tokenizers):
    records = [
        RawRecord("Q one?", "<<1+1=2>> <<2+3=5>> <<5*2=10>>", "#### 10", "a"),
        RawRecord("Q two?", "<<4+4=8>>", "#### 8", "b"),
    ]
    plain, _ = _build(tokenizers, "gpt2", records)
    assert "step_value_ids" not in plain[0] and plain.examples[0].step_value_ids is None
    assert "latent_step_labels" not in CODICollator(0)([plain[0], plain[1]])
    dataset, _ = _build(tokenizers, "gpt2", records, step_targets=True)
    first, second = dataset.examples
    assert len(first.step_value_ids) == 3 and len(second.step_value_ids) == 1
    batch = CODICollator(0)([dataset[0], dataset[1]])
    assert batch["latent_step_labels"].tolist() == [
        first.step_value_ids,
        second.step_value_ids + [IGNORE_INDEX, IGNORE_INDEX],
    ]
    sft, _ = _build(tokenizers, "gpt2", records, step_targets=True, method="cot_sft")
    assert "step_value_ids" not in sft[0]  # baselines have no latents to supervise


def test_step_targets_on_a_cot_without_equations_is_a_clear_error(tokenizers, caplog):
    nl = [RawRecord("Q?", "Half of 10 is 5. So 5 are left.", "#### 5", "nl:1")]
    with pytest.raises(DataError, match=r"none of the 1 records has one \(first: nl:1;"):
        _build(tokenizers, "gpt2", nl, step_targets=True)
    mixed = nl + [RawRecord("Q two?", "<<4+4=8>> <<8*1=8>>", "#### 8", "eq:1")]
    with caplog.at_level("WARNING"):
        dataset, _ = _build(tokenizers, "gpt2", mixed, step_targets=True)
    assert len(dataset) == 2 and "1 of 2 records have no equation step (first: nl:1)" in caplog.text


# --------------------------------------------------------------------------------------------------
# Batched tokenisation (codi.data.token_batches): the same examples as one call per text


def _records_for_batching():
    from codi.data.synth import SynthConfig, make_splits

    synthetic = make_splits(SynthConfig(n_train=40, n_validation=0, n_test=0, seed=3))["train"]
    extra = [
        RawRecord(row["question"], row["cot"], row["answer"], f"synth:{index}")
        for index, row in enumerate(synthetic)
    ]
    odd = [
        RawRecord("No steps here.", "", "#### 4", "odd:0"),
        RawRecord("Negative?", "<<2-5=-3>>", "#### -3", "odd:1"),
        RawRecord("Empty answer", "<<1+1=2>>", "####", "odd:2"),
        RawRecord("Long " * 400, "<<1+1=2>>", "#### 2", "odd:3"),
    ]
    return RECORDS + odd + extra + RECORDS


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize(
    "options",
    [
        dict(method="codi", step_targets=True),
        dict(method="cot_sft"),
        dict(method="no_cot_sft", skip_negative_answers=True),
        dict(method="codi", include_last_cot=True, max_samples=7),
        dict(method="codi", cot_style="commonsense"),
    ],
)
def test_batched_tokenisation_builds_the_same_examples(make_model, monkeypatch, arch, options):
    """Chunks of 5 records (several chunks, one cut mid-way by max_samples), against the tokenizer
    called once per text as before: identical examples, counts and drop reasons."""
    import codi.data.token_batches as token_batches
    from codi.data.dataset import build_dataset

    model = make_model(arch)
    records = _records_for_batching()
    tokenizer = _CountingTokenizer(model.tokenizer)
    common = dict(bot_id=model.bot_id, eot_id=model.eot_id, max_token_num=300, **options)
    monkeypatch.setattr(token_batches.chunks, "__defaults__", (5,))
    batched, batched_stats = build_dataset(records, tokenizer, **common)
    batched_calls, tokenizer.calls = tokenizer.calls, 0
    monkeypatch.setattr(token_batches.PrefetchedTokenizer, "prefetch", lambda self, *args, **kwargs: None)
    single, single_stats = build_dataset(records, tokenizer, **common)
    assert batched_calls * 2 < tokenizer.calls  # the batched calls answered most of them
    assert batched.examples == single.examples
    assert (batched_stats.read, batched_stats.kept, batched_stats.dropped) == (
        single_stats.read,
        single_stats.kept,
        single_stats.dropped,
    )
    assert batched_stats.dropped  # the odd records exercise the drop reasons


class _CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

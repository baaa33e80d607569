"""Training data: the preprocessing (docs/method.md#preprocessing), teacher/student views, collation.

Records are read by `codi.data.records`.

A record becomes one `Example` holding both views of the same problem:

    teacher  : Q ++ CoT ++ A ++ [eos]            labels: question positions = -100
    student  : Q ++ [bot]  (encoder, left-padded in a batch)
               [eot] ++ A ++ [eos]               (decoder, labels = the same ids)

where A = tokens of "The answer is: {value}". The distillation position of each view is the index of
the token whose next token is the first token of the answer value, found from character offsets.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..inference.scoring import ANSWER_PROMPT, as_number
from ..losses import IGNORE_INDEX
from .collate import CODICollator, attention_mask_for, pad_sequences  # noqa: F401 (re-exported)
from .records import DataError, DataStats, RawRecord, load_records, read_records  # noqa: F401 (re-exported)
from .token_batches import PrefetchedTokenizer, chunks

logger = logging.getLogger(__name__)

_STEP_RESULT = re.compile(r"<<[^<>]*=\s*([^<>=\s][^<>=]*?)\s*>>")


@dataclass
class Example:
    """Token ids of both views of one record (no padding)."""

    question_ids: list[int]
    cot_ids: list[int]
    answer_ids: list[int]
    answer_value_index: int  # index, inside answer_ids, of the first token of the answer value
    teacher_input_ids: list[int]
    teacher_labels: list[int]
    teacher_distill_pos: int
    student_input_ids: list[int]
    decoder_input_ids: list[int]
    decoder_distill_pos: int
    # first token of each CoT step's result, ALL steps (the dropped last one too); filled only when
    # the optional latent step supervision asks for it (`step_targets`), else None
    step_value_ids: list[int] | None = None

    def as_features(self, method: str) -> dict[str, list[int] | int]:
        features: dict[str, list[int] | int] = {
            "teacher_input_ids": self.teacher_input_ids,
            "teacher_labels": self.teacher_labels,
            "teacher_distill_pos": self.teacher_distill_pos,
        }
        if method == "codi":
            features.update(
                student_input_ids=self.student_input_ids,
                decoder_input_ids=self.decoder_input_ids,
                decoder_distill_pos=self.decoder_distill_pos,
            )
            if self.step_value_ids is not None:
                features["step_value_ids"] = self.step_value_ids
        return features


# --------------------------------------------------------------------------------------------------
# Reference preprocessing (docs/method.md#preprocessing)


def answer_value(answer: str) -> str:
    """The last whitespace token of the answer, with `####` removed."""
    tokens = answer.replace("####", " ").split()
    return tokens[-1] if tokens else ""


def process_cot(cot: str, style: str = "auto", include_last_cot: bool = False) -> str:
    """Equation CoTs split on single spaces, NL CoTs on '. '; the last step is dropped unless asked."""
    if style == "auto":
        style = "equation" if "<<" in cot else "nl"
    if style == "equation":
        steps = cot.split(" ")
        if not include_last_cot:
            steps = steps[:-1]
        return " ".join(steps)
    steps = cot.split(". ")
    if not include_last_cot:
        steps = steps[:-1]
    return ". ".join(steps) + ".\n" if steps else ""


def answer_text(value: str, answer_prompt: str = ANSWER_PROMPT) -> str:
    return f"{answer_prompt} {value}"


def step_value_token_ids(tokenizer, cot: str) -> list[int]:
    """First token id of the result of each equation step `<<...=c>>` of a (whole) CoT, in order.

    Tokenised in context (the value as it appears after `=` in the CoT), so tokenizers that merge a
    leading space or split numbers are handled alike. Natural-language CoTs have no steps: [].
    """
    matches = list(_STEP_RESULT.finditer(cot))
    if not matches:
        return []
    try:
        encoded = tokenizer(cot, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    except (NotImplementedError, KeyError, TypeError):
        return [tokenizer(m.group(1), add_special_tokens=False)["input_ids"][0] for m in matches]
    values = []
    for match in matches:
        start = match.start(1)
        index = next((i for i, (_, end) in enumerate(offsets) if end > start), None)
        if index is not None:
            values.append(ids[index])
    return values


# --------------------------------------------------------------------------------------------------
# Tokenisation and the two views


def encode_question(tokenizer, question: str) -> list[int]:
    """Question ids with the special tokens the tokenizer puts BEFORE the text (BOS), none after (EOS)."""
    plain = list(tokenizer(question, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(question, add_special_tokens=True)["input_ids"])
    for lead in range(len(full) - len(plain) + 1):
        if full[lead : lead + len(plain)] == plain:
            return full[: lead + len(plain)]
    return plain  # a post-processor that rewrites the text tokens: keep the text alone


def encode_answer(tokenizer, value: str, answer_prompt: str = ANSWER_PROMPT) -> tuple[list[int], int]:
    """Ids of `"{answer_prompt} {value}"` and the index of the first token that carries the value.

    The value's first character is located by character offsets, so tokenizers that emit the space
    before a number as its own token (Llama-3) are handled like those that glue it to the number
    (GPT-2): the distillation position is always the token just before that index.
    """
    text = answer_text(value, answer_prompt)
    value_start = len(text) - len(value)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
        index = next((i for i, (_, end) in enumerate(offsets) if end > value_start), None)
    except (NotImplementedError, KeyError, TypeError):
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        index = next((i for i in range(len(ids)) if len(tokenizer.decode(ids[: i + 1])) > value_start), None)
    if index is None or index == 0:
        raise ValueError(
            f"cannot locate the answer value {value!r} after the prompt {answer_prompt!r} in the "
            f"tokenisation of {text!r} (ids {ids}): the distillation position is undefined"
        )
    return ids, index


def build_example(
    tokenizer,
    question: str,
    cot: str,
    value: str,
    *,
    bot_id: int | None,
    eot_id: int | None,
    method: str = "codi",
    answer_prompt: str = ANSWER_PROMPT,
    step_targets_from: str | None = None,
) -> Example:
    """The teacher and student views of one preprocessed record (see the module docstring).

    `step_targets_from`: the whole (unprocessed) CoT, to fill `step_value_ids` (codi only).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; CODI targets end with EOS")
    question_ids = encode_question(tokenizer, question)
    cot_ids = (
        list(tokenizer(cot, add_special_tokens=False)["input_ids"]) if cot and method != "no_cot_sft" else []
    )
    answer_ids, value_index = encode_answer(tokenizer, value, answer_prompt)
    target = cot_ids + answer_ids + [eos]
    teacher_input_ids = question_ids + target
    teacher_labels = [IGNORE_INDEX] * len(question_ids) + target
    teacher_distill_pos = len(question_ids) + len(cot_ids) + value_index - 1
    student_input_ids, decoder_input_ids, decoder_distill_pos = [], [], 0
    if method == "codi":
        if bot_id is None or eot_id is None:
            raise ValueError("method 'codi' needs the <bot> and <eot> token ids")
        student_input_ids = question_ids + [bot_id]
        decoder_input_ids = [eot_id] + answer_ids + [eos]
        decoder_distill_pos = value_index  # 1 for [eot], then value_index - 1 inside the answer
    return Example(
        question_ids=question_ids,
        cot_ids=cot_ids,
        answer_ids=answer_ids,
        answer_value_index=value_index,
        teacher_input_ids=teacher_input_ids,
        teacher_labels=teacher_labels,
        teacher_distill_pos=teacher_distill_pos,
        student_input_ids=student_input_ids,
        decoder_input_ids=decoder_input_ids,
        decoder_distill_pos=decoder_distill_pos,
        step_value_ids=(
            step_value_token_ids(tokenizer, step_targets_from)
            if step_targets_from is not None and method == "codi"
            else None
        ),
    )


class CODIDataset(torch.utils.data.Dataset):
    """Pre-tokenised examples; `__getitem__` returns the features that the collator pads."""

    def __init__(self, examples: list[Example], method: str = "codi"):
        self.examples = examples
        self.method = method

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index].as_features(self.method)


def build_dataset(
    records: Iterable[RawRecord],
    tokenizer,
    *,
    bot_id: int | None,
    eot_id: int | None,
    method: str = "codi",
    cot_style: str = "auto",
    include_last_cot: bool = False,
    max_token_num: int = 1000,
    skip_negative_answers: bool = False,
    answer_prompt: str = ANSWER_PROMPT,
    max_samples: int | None = None,
    name: str = "train",
    step_targets: bool = False,
    position_limit: int | None = None,
    num_latent: int = 0,
) -> tuple[CODIDataset, DataStats]:
    """Preprocess and tokenise records; every dropped record is counted by reason and logged.

    `step_targets`: also tokenise each CoT step's result (the optional latent step supervision).
    `position_limit`: the model's position count (learned position tables fail past it): records whose
    teacher sequence, or student sequence with `num_latent` latents, is longer are dropped and counted.
    Answers that are not numbers are kept (CommonsenseQA's are letters) but counted and logged.
    """
    stats = DataStats()
    examples = []
    first_without_steps = ""  # where the first record without equation steps is (step targets only)
    without_cot: list[str] = []  # kept records with no CoT at all (where each is)
    tokens = PrefetchedTokenizer(tokenizer)  # each record tokenised as before, in batched calls
    fields = (cot_style, include_last_cot, answer_prompt)
    for record in _prefetched(records, tokens, fields, skip_negative_answers, method, step_targets):
        if max_samples is not None and stats.kept >= max_samples:
            break
        stats.read += 1
        value, question, cot, reason = screen_record(
            record,
            tokens,
            cot_style,
            include_last_cot,
            max_token_num,
            skip_negative_answers,
            answer_prompt,
        )
        if reason is None:
            step_source = record.cot if step_targets else None
            example = build_example(
                tokens,
                question,
                cot,
                value,
                bot_id=bot_id,
                eot_id=eot_id,
                method=method,
                answer_prompt=answer_prompt,
                step_targets_from=step_source,
            )
            if position_limit is not None and _positions_needed(example, num_latent) > position_limit:
                reason = "longer_than_model_positions"
        if reason is not None:
            stats.dropped[reason] += 1
            stats.first_dropped.setdefault(reason, record.where)
            continue
        if cot_style != "commonsense" and as_number(value) is None:
            stats.flagged["non_numeric_answer"] += 1
            stats.first_flagged.setdefault("non_numeric_answer", f"{record.where} ({value!r})")
        examples.append(example)
        stats.kept += 1
        if not record.cot.strip():
            without_cot.append(record.where)
        if step_targets and example.step_value_ids == [] and not first_without_steps:
            first_without_steps = record.where
    stats.log(name, logger)
    if not examples:
        raise DataError(f"{name}: no usable records (read {stats.read}, dropped {dict(stats.dropped)})")
    _check_cot_present(name, method, len(examples), without_cot)
    if step_targets and method == "codi":
        _check_step_targets(name, examples, first_without_steps)
    return CODIDataset(examples, method), stats


def screen_record(
    record: RawRecord,
    tokenizer,
    cot_style: str,
    include_last_cot: bool,
    max_token_num: int,
    skip_negative_answers: bool,
    answer_prompt: str = ANSWER_PROMPT,
) -> tuple[str, str, str, str | None]:
    """(answer value, question, processed CoT, why the record is dropped or None): the reference's
    filters, the same for every method that trains on records (CODI, the baselines, Coconut)."""
    value = answer_value(record.answer)
    reason = _drop_reason(value, skip_negative_answers)
    if reason is not None:
        return value, record.question, "", reason
    question, cot, raw = _fields(record, value, cot_style, include_last_cot, answer_prompt)
    # The reference's length filter runs on the RAW fields (whole CoT, special tokens included): it
    # decides which records exist, so it is reproduced as is.
    if len(tokenizer(raw)["input_ids"]) > max_token_num:
        reason = "longer_than_max_token_num"
    return value, question, cot, reason


def _drop_reason(value: str, skip_negative_answers: bool) -> str | None:
    if not value:
        return "empty_answer"
    if skip_negative_answers and not value[0].isdigit():
        return "answer_not_starting_with_digit"
    return None


def _fields(record: RawRecord, value: str, cot_style: str, include_last_cot: bool, answer_prompt: str):
    """(question, processed CoT, the raw text the reference's length filter measures)."""
    if cot_style == "commonsense":
        # The reference's CommonsenseQA branch: whole CoT (no step dropped), newline-terminated parts.
        question, cot = record.question.strip() + "\n", record.cot.strip() + "\n"
        return question, cot, f"{question} {cot} {answer_text(value, answer_prompt)}"
    cot = process_cot(record.cot, cot_style, include_last_cot)
    return record.question, cot, record.question + record.cot + record.answer


def _prefetched(
    records, tokens: PrefetchedTokenizer, fields: tuple, skip_negative: bool, method: str, steps: bool
):
    """`records`, chunk by chunk, each chunk's texts tokenised beforehand in a few batched calls."""
    for chunk in chunks(records):
        tokens.clear()
        texts: dict[tuple[bool, bool], list[str]] = {(True, False): [], (False, False): [], (False, True): []}
        for record in chunk:
            value = answer_value(record.answer)
            if _drop_reason(value, skip_negative) is not None:
                continue
            question, cot, raw = _fields(record, value, *fields)
            texts[True, False] += [raw, question]
            texts[False, False] += [question] + ([cot] if cot and method != "no_cot_sft" else [])
            texts[False, True] += [answer_text(value, fields[2])] + ([record.cot] if steps else [])
        for (special, offsets), batch in texts.items():
            tokens.prefetch(batch, add_special_tokens=special, offsets=offsets)
        yield from chunk


def _positions_needed(example: Example, num_latent: int) -> int:
    """The longest sequence of positions the model sees for this example (teacher or student)."""
    student = len(example.student_input_ids) + num_latent + len(example.decoder_input_ids)
    return max(len(example.teacher_input_ids), student if example.student_input_ids else 0)


def _check_cot_present(name: str, method: str, kept: int, without_cot: list[str]) -> None:
    """CODI and CoT-SFT learn from the chain of thought: records with none would silently train a
    No-CoT model (e.g. a JSONL whose CoT key is misspelt, read as GSM8k rows without annotations)."""
    if method not in ("codi", "cot_sft") or not without_cot:
        return
    if len(without_cot) == kept:
        raise DataError(
            f"{name}: method {method} learns from a chain of thought, and none of the {kept} records has "
            f"one (first: {without_cot[0]}): give each record a `cot` (or GSM8k <<...>> annotations in its "
            "answer), or train --method no_cot_sft"
        )
    logger.warning(
        "%s: %d of %d records have no chain of thought (first: %s)",
        name,
        len(without_cot),
        kept,
        without_cot[0],
    )


def _check_step_targets(name: str, examples: list[Example], first_without_steps: str) -> None:
    without = sum(not example.step_value_ids for example in examples)
    if without == len(examples):
        raise DataError(
            f"{name}: the latent step supervision needs equation steps `<<...=c>>` in the CoT, and none "
            f"of the {len(examples)} records has one (first: {first_without_steps}; natural-language "
            "CoT?): set latent_step_loss_factor 0"
        )
    if without:
        logger.warning(
            "%s: %d of %d records have no equation step (first: %s): no step supervision for them",
            name,
            without,
            len(examples),
            first_without_steps,
        )

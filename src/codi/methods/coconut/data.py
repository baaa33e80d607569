"""Coconut's curriculum data (Hao et al. 2024, facebookresearch/coconut `dataset.py`).

A record is tokenised once into question / CoT steps / answer. At curriculum stage k its training
sequence replaces the first k CoT steps with k x `c_thought` continuous thoughts:

    question <bot> [latent] x n <eot> steps[k:] answer <eos>        labels: -100 up to and with <eot>

Stages above `max_latent_stage` remove every step and keep `max_latent_stage` x `c_thought` thoughts
(`pad_latent_to_max`) or one group per step the record has, capped at `max_latent_stage`. With
`uniform_prob` a record is instead drawn, per epoch, at a uniform stage in 0..(its number of steps).
The stage follows the epoch (the reference) or, with `steps_per_stage` (this project's addition for
runs budgeted in optimizer steps), the optimizer step.
Question, steps and answer use this project's formats (the ones CoT-SFT trains on: no newline after the
question, "The answer is: N"), so stage 0 of a record is its CoT-SFT sequence with `<bot><eot>` inserted.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ...config import ANSWER_PROMPT
from ...data.dataset import (
    IGNORE_INDEX,
    DataError,
    DataStats,
    RawRecord,
    attention_mask_for,
    encode_answer,
    encode_question,
    pad_sequences,
    screen_record,
)
from .schedule import CoconutArguments, mixing_rng, record_stage, stage_plan

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Records


@dataclass
class CoconutRecord:
    """One tokenised record: question, CoT steps (their concatenation is CoT-SFT's CoT) and answer."""

    question_ids: list[int]
    step_ids: list[list[int]]
    answer_ids: list[int]  # answer prompt + value + eos
    where: str = ""


def step_starts(cot: str, style: str) -> list[int]:
    """Character offsets where each step of a processed CoT (`process_cot`) begins.

    Equation CoTs are steps joined by single spaces, natural-language ones by '. ' (see process_cot).
    """
    if not cot:
        return []
    separator = " " if style == "equation" else ". "
    starts = [0]
    position = cot.find(separator)
    while position != -1:
        starts.append(position + len(separator))
        position = cot.find(separator, position + len(separator))
    return starts


def split_cot_ids(tokenizer, cot: str, starts: Sequence[int]) -> list[list[int]]:
    """The CoT's token ids (tokenised whole, as CoT-SFT does) cut into steps.

    A token goes to the step holding its last character, so a space glued to the next step's first
    word goes with that step. Slow tokenizers without offsets: each step's text tokenised on its own.
    """
    if not starts:
        return []
    try:
        encoded = tokenizer(cot, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    except (NotImplementedError, KeyError, TypeError):
        bounds = list(starts) + [len(cot)]
        return [
            list(tokenizer(cot[bounds[i] : bounds[i + 1]], add_special_tokens=False)["input_ids"])
            for i in range(len(starts))
        ]
    steps: list[list[int]] = [[] for _ in starts]
    for token, (start, end) in zip(ids, offsets):
        steps[max(bisect.bisect_right(starts, max(end - 1, start)) - 1, 0)].append(token)
    return steps


def tokenize_records(
    records: Iterable[RawRecord],
    tokenizer,
    *,
    cot_style: str = "auto",
    include_last_cot: bool = False,
    max_token_num: int = 1000,
    skip_negative_answers: bool = False,
    answer_prompt: str = ANSWER_PROMPT,
    max_samples: int | None = None,
    name: str = "train",
) -> tuple[list[CoconutRecord], DataStats]:
    """Tokenise records into steps, screened by the reference's filters as `codi.data.dataset.build_dataset`
    screens them (`codi.data.dataset.screen_record`); unlike it, no cap at the model's positions and no count of
    non-numeric answers."""
    if cot_style == "commonsense":
        raise DataError("coconut: cot_style commonsense has no steps to remove; use equation | nl | auto")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; Coconut targets end with EOS")
    stats, out = DataStats(), []
    for record in records:
        if max_samples is not None and stats.kept >= max_samples:
            break
        stats.read += 1
        style = cot_style if cot_style != "auto" else ("equation" if "<<" in record.cot else "nl")
        value, _, cot, reason = screen_record(
            record, tokenizer, style, include_last_cot, max_token_num, skip_negative_answers, answer_prompt
        )
        if reason is not None:
            stats.dropped[reason] += 1
            stats.first_dropped.setdefault(reason, record.where)
            continue
        answer_ids, _ = encode_answer(tokenizer, value, answer_prompt)
        out.append(
            CoconutRecord(
                question_ids=encode_question(tokenizer, record.question),
                step_ids=split_cot_ids(tokenizer, cot, step_starts(cot, style)),
                answer_ids=answer_ids + [eos],
                where=record.where,
            )
        )
        stats.kept += 1
    stats.log(name, logger)
    if not out:
        raise DataError(f"{name}: no usable records (read {stats.read}, dropped {dict(stats.dropped)})")
    return out, stats


# --------------------------------------------------------------------------------------------------
# Training sequences


@dataclass(frozen=True)
class MarkerIds:
    bot: int
    eot: int
    pause: int | None = None


def stage_features(record: CoconutRecord, stage: int, args: CoconutArguments, ids: MarkerIds) -> dict:
    """Features of one record at one stage.

    Continuous thoughts (Coconut): prefix_ids = question <bot> (left-padded in a batch), num_latent,
    suffix_ids = <eot> steps[removed:] answer, labels = suffix_ids with -100 on <eot>.
    Token sequences (pause as thought, w/o thought): input_ids and labels (-100 on the question, the
    markers and the <pause> tokens).
    """
    removed, num_latent = stage_plan(stage, len(record.step_ids), args)
    rest = [token for step in record.step_ids[removed:] for token in step] + record.answer_ids
    if args.variant == "coconut":
        return {
            "prefix_ids": record.question_ids + [ids.bot],
            "num_latent": num_latent,
            "suffix_ids": [ids.eot] + rest,
            "labels": [IGNORE_INDEX] + rest,
        }
    if args.variant == "pause":
        if ids.pause is None:
            raise ValueError("pause_as_thought needs the <pause> token id")
        head = record.question_ids + [ids.bot] + [ids.pause] * num_latent + [ids.eot]
    else:
        head = list(record.question_ids)
    return {"input_ids": head + rest, "labels": [IGNORE_INDEX] * len(head) + rest}


class CoconutDataset(torch.utils.data.Dataset):
    """Tokenised records whose features follow the current stage (set by `CurriculumCallback`: each
    epoch, or each optimizer step under steps_per_stage).

    With uniform_prob > 0 each record's stage is drawn per (seed, epoch, index), so an epoch's data do
    not depend on the order of access or on dataloader workers.
    """

    def __init__(self, records: list[CoconutRecord], args: CoconutArguments, ids: MarkerIds, seed: int = 0):
        self.records, self.args, self.ids, self.seed = records, args, ids, seed
        self.stage, self.epoch = 0, 0

    def set_stage(self, stage: int, epoch: int) -> None:
        self.stage, self.epoch = stage, epoch

    def __len__(self) -> int:
        return len(self.records)

    def stage_of(self, index: int) -> int:
        if self.args.uniform_prob <= 0:
            return self.stage
        rng = mixing_rng(self.seed, self.epoch, index)
        return record_stage(self.stage, len(self.records[index].step_ids), self.args.uniform_prob, rng)

    def __getitem__(self, index: int) -> dict:
        return stage_features(self.records[index], self.stage_of(index), self.args, self.ids)


class RecordIndices(torch.utils.data.Dataset):
    """A CoconutDataset's records as indices only: the Trainer's dataloader says which records a
    micro-batch holds, and `CoconutTrainer` builds their sequences (`collate`) when the step trains on them.

    Why: the Trainer fetches a step's micro-batches before calling `on_step_begin`, and accelerate's
    DataLoaderShard collates one batch ahead of that, so sequences built in the dataloader (in __getitem__
    or in the collator) would show a step-scheduled stage switch two steps late.
    """

    def __init__(self, dataset: CoconutDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {"record_index": index}

    def collate(self, record_index: torch.Tensor, collator: CoconutCollator) -> dict[str, torch.Tensor]:
        """The batch of these records at the dataset's current stage."""
        return collator([self.dataset[int(index)] for index in record_index.tolist()])


@dataclass
class CoconutCollator:
    """Pads features into a batch.

    Continuous: prefix_* LEFT-padded (the question ends in the same column for every row, so the
    thoughts are fed in lockstep), num_latent (B,), suffix_* and labels right-padded.
    Token sequences: input_ids, attention_mask, labels right-padded.
    `RecordIndices` items: record_index (B,), the sequences are built later.
    """

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if "record_index" in features[0]:
            return {"record_index": torch.tensor([feature["record_index"] for feature in features])}
        labels = [feature["labels"] for feature in features]
        if "prefix_ids" in features[0]:
            prefix = [feature["prefix_ids"] for feature in features]
            suffix = [feature["suffix_ids"] for feature in features]
            return {
                "prefix_ids": pad_sequences(prefix, self.pad_token_id, "left"),
                "prefix_mask": attention_mask_for(prefix, "left"),
                "num_latent": torch.tensor([feature["num_latent"] for feature in features]),
                "suffix_ids": pad_sequences(suffix, self.pad_token_id, "right"),
                "suffix_mask": attention_mask_for(suffix, "right"),
                "labels": pad_sequences(labels, IGNORE_INDEX, "right"),
            }
        tokens = [feature["input_ids"] for feature in features]
        return {
            "input_ids": pad_sequences(tokens, self.pad_token_id, "right"),
            "attention_mask": attention_mask_for(tokens, "right"),
            "labels": pad_sequences(labels, IGNORE_INDEX, "right"),
        }


def loss_targets(batch: dict[str, torch.Tensor]) -> list[set[tuple[int, int]]]:
    """Per row, the (position in the unpadded sequence, target id) pairs that carry loss: a label at
    position p is predicted by position p - 1 (for inspection and tests)."""
    labels = batch["labels"].tolist()
    if "prefix_ids" in batch:
        offsets = (batch["prefix_mask"].sum(-1) + batch["num_latent"]).tolist()
    else:
        offsets = [0] * len(labels)
    return [
        {(offset + index, label) for index, label in enumerate(row) if label != IGNORE_INDEX}
        for offset, row in zip(offsets, labels)
    ]

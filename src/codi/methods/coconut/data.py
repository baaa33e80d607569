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
import dataclasses
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ...data import (
    IGNORE_INDEX,
    DataError,
    DataStats,
    RawRecord,
    answer_value,
    attention_mask_for,
    encode_answer,
    encode_question,
    pad_sequences,
    process_cot,
)

logger = logging.getLogger(__name__)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class CoconutArguments:
    """Coconut's settings, under the reference's names (its `args/gsm_coconut.yaml`)."""

    c_thought: int = field(default=2, metadata={"help": "Continuous thoughts per removed CoT step."})
    epochs_per_stage: int = field(
        default=3, metadata={"help": "Epochs of each curriculum stage (the reference's epoch schedule)."}
    )
    steps_per_stage: int = field(
        default=0,
        metadata={
            "help": "This project's addition for step budgets: > 0 sets the stage by optimizer step, "
            "start_stage + global_step // steps_per_stage (capped at the final stage), instead of by "
            "epoch; 0: the reference's epoch schedule (epochs_per_stage, start_epoch)."
        },
    )
    start_stage: int = field(
        default=0,
        metadata={
            "help": "Stage of the first optimizer step under steps_per_stage (1 skips stage 0 when "
            "starting from a CoT-SFT checkpoint); the epoch schedule uses start_epoch instead."
        },
    )
    max_latent_stage: int = field(
        default=3,
        metadata={"help": "Last stage that adds thoughts; later stages remove every CoT step."},
    )
    pad_latent_to_max: bool = field(
        default=True,
        metadata={
            "help": "After max_latent_stage, give every record max_latent_stage x c_thought thoughts "
            "(False: one group per step it has, capped at max_latent_stage)."
        },
    )
    uniform_prob: float = field(
        default=0.0,
        metadata={"help": "Probability that a record is drawn at a uniform stage 0..#steps instead."},
    )
    reset_optimizer: bool = field(
        default=True, metadata={"help": "Clear the optimizer state (AdamW moments) at a stage switch."}
    )
    reset_optimizer_every: str = field(
        default="stage",
        metadata={
            "help": "stage (the paper: when the stage changes) | epoch (the released run.py, which "
            "recreates the optimizer at every epoch)."
        },
    )
    start_epoch: int = field(
        default=0,
        metadata={
            "help": "Curriculum epoch of the first training epoch (the reference's `resume`: 3 skips "
            "stage 0 when starting from a CoT-SFT checkpoint)."
        },
    )
    no_curriculum: bool = field(
        default=False,
        metadata={"help": "Ablation 'w/o curriculum': train on the final stage from the first epoch."},
    )
    no_thoughts: bool = field(
        default=False,
        metadata={
            "help": "Ablation 'w/o thought' (reference no_thoughts): the curriculum removes steps but "
            "adds no thoughts and no <bot>/<eot> markers."
        },
    )
    pause_as_thought: bool = field(
        default=False,
        metadata={
            "help": "Ablation 'pause as thought': a learned <pause> token embedding at every thought "
            "position instead of the fed-back hidden state."
        },
    )
    init_markers_from: str = field(
        default="<<",
        metadata={
            "help": "Initialise the <bot>/<eot> (and <pause>) embedding rows from this text's tokens, as "
            "the reference does with '<<'; '' keeps them as they are."
        },
    )

    def __post_init__(self) -> None:
        _check(self.c_thought >= 0, f"c_thought must be >= 0, got {self.c_thought}")
        _check(self.epochs_per_stage >= 1, f"epochs_per_stage must be >= 1, got {self.epochs_per_stage}")
        _check(self.max_latent_stage >= 0, f"max_latent_stage must be >= 0, got {self.max_latent_stage}")
        _check(0.0 <= self.uniform_prob <= 1.0, f"uniform_prob must be in [0, 1], got {self.uniform_prob}")
        _check(self.start_epoch >= 0, f"start_epoch must be >= 0, got {self.start_epoch}")
        _check(self.steps_per_stage >= 0, f"steps_per_stage must be >= 0, got {self.steps_per_stage}")
        _check(self.start_stage >= 0, f"start_stage must be >= 0, got {self.start_stage}")
        self._check_schedule()
        _check(
            self.reset_optimizer_every in ("stage", "epoch"),
            f"reset_optimizer_every must be stage | epoch, got {self.reset_optimizer_every!r}",
        )
        _check(
            not (self.no_thoughts and self.pause_as_thought),
            "no_thoughts and pause_as_thought are two different ablations: set at most one",
        )

    def _check_schedule(self) -> None:
        """Each schedule has its own start; a setting of the other one would be silently ignored."""
        if self.steps_per_stage == 0:
            _check(self.start_stage == 0, "start_stage applies to steps_per_stage > 0; use start_epoch")
            return
        _check(self.start_epoch == 0, "start_epoch applies to the epoch schedule; use start_stage")
        _check(
            self.reset_optimizer_every == "stage",
            "reset_optimizer_every epoch belongs to the epoch schedule; steps_per_stage resets at stages",
        )

    @property
    def by_steps(self) -> bool:
        """Whether the stage follows the optimizer step (steps_per_stage) rather than the epoch."""
        return self.steps_per_stage > 0

    @property
    def variant(self) -> str:
        """coconut | pause (pause as thought) | no_thoughts (w/o thought)."""
        return "no_thoughts" if self.no_thoughts else "pause" if self.pause_as_thought else "coconut"

    @property
    def thoughts_per_step(self) -> int:
        return 0 if self.no_thoughts else self.c_thought

    @property
    def final_stage(self) -> int:
        """The first stage that removes every step; all later stages build the same sequences."""
        return self.max_latent_stage + 1

    @property
    def inference_latents(self) -> int:
        """Thoughts fed at inference: the final stage's. (Without pad_latent_to_max the reference reads
        the number of steps of the test record's gold CoT; a question alone does not tell it.)"""
        return self.max_latent_stage * self.thoughts_per_step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# The schedule


def stage_for_epoch(
    epoch: int, epochs_per_stage: int, max_latent_stage: int, no_curriculum: bool = False
) -> int:
    """Curriculum stage of a (curriculum) epoch: epoch // epochs_per_stage, capped at the final stage
    max_latent_stage + 1 (the reference lets it grow, but every stage past max_latent_stage builds the
    same sequences). `no_curriculum`: the final stage from the start."""
    final = max_latent_stage + 1
    return final if no_curriculum else min(epoch // epochs_per_stage, final)


def stage_for_step(
    step: int, steps_per_stage: int, max_latent_stage: int, start_stage: int = 0, no_curriculum: bool = False
) -> int:
    """Curriculum stage of optimizer step `step` (0-based, the Trainer's global_step before the update):
    start_stage + step // steps_per_stage, capped at the final stage as `stage_for_epoch` is."""
    final = max_latent_stage + 1
    return final if no_curriculum else min(start_stage + step // steps_per_stage, final)


def stage_plan(stage: int, num_steps: int, args: CoconutArguments) -> tuple[int, int]:
    """(CoT steps removed, thought positions) for a record of `num_steps` steps at `stage`.

    Up to max_latent_stage: stage steps removed (all of them if the record has fewer) and stage groups of
    thoughts, whatever the record's length; later: every step removed and max_latent_stage groups
    (pad_latent_to_max) or min(num_steps, max_latent_stage) groups.
    """
    if stage > args.max_latent_stage:
        groups = args.max_latent_stage if args.pad_latent_to_max else min(num_steps, args.max_latent_stage)
        removed = num_steps
    else:
        groups, removed = stage, min(stage, num_steps)
    return removed, groups * args.thoughts_per_step


def record_stage(scheduled: int, num_steps: int, uniform_prob: float, rng: random.Random) -> int:
    """The stage one record trains at: `scheduled`, or with probability uniform_prob a uniform draw
    from 0..num_steps (the reference draws from the record's own step count, not from the stages)."""
    if rng.random() < uniform_prob:
        return rng.randrange(num_steps + 1)
    return scheduled


def mixing_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A private generator per (seed, epoch, record): the same draws in any process or worker."""
    return random.Random(f"coconut:{seed}:{epoch}:{index}")


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
    answer_prompt: str = "The answer is:",
    max_samples: int | None = None,
    name: str = "train",
) -> tuple[list[CoconutRecord], DataStats]:
    """Tokenise records into steps; filters and counts exactly like `codi.data.build_dataset`."""
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
        value = answer_value(record.answer)
        if not value:
            stats.dropped["empty_answer"] += 1
            continue
        if skip_negative_answers and not value[0].isdigit():
            stats.dropped["answer_not_starting_with_digit"] += 1
            continue
        if len(tokenizer(record.question + record.cot + record.answer)["input_ids"]) > max_token_num:
            stats.dropped["longer_than_max_token_num"] += 1
            continue
        style = cot_style if cot_style != "auto" else ("equation" if "<<" in record.cot else "nl")
        cot = process_cot(record.cot, style, include_last_cot)
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
    stats.log(name)
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


def coconut_stage_examples(
    records: Sequence[CoconutRecord], stage: int, args: CoconutArguments, ids: MarkerIds
) -> list[dict]:
    """Every record at one stage (no mixing): what an epoch of that stage trains on."""
    return [stage_features(record, stage, args, ids) for record in records]


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

"""What the trainers (`codi.training.CODITrainer` and the methods') are given: `CODIConfig`, every setting
of a run in one object, and besides built objects a model given by hub id or folder and training data
given as a `datasets.Dataset` (or a list of dicts) with `question`, `cot` and `answer` columns.

A missing column, a `DatasetDict` instead of one split, or a value that is not text is a one-line
`DataError` naming the dataset, the column and, for a value, the row.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import (
    ALIASES,
    ARGUMENT_CLASSES,
    TRAIN_DESCRIPTION,
    CODIDataArguments,
    CODIModelArguments,
    CODITrainingArguments,
)
from .data.dataset import CODIDataset, DataStats, build_dataset
from .data.records import DataError, RawRecord, load_records
from .io.hf import max_positions
from .model import CODIModel
from .run_safety import records_fingerprint


@dataclass
class CODIConfig(CODITrainingArguments, CODIDataArguments, CODIModelArguments):
    """Every setting of a run in one object, as TRL's trainer configs: HF `TrainingArguments`, the CODI
    loss and method, the model's settings (`CODIModelArguments`) and the data's (`CODIDataArguments`).

        CODITrainer(model="gpt2", args=CODIConfig(output_dir="runs/x", num_latent=6), train_dataset=ds)
    """

    METHOD_PARTS: typing.ClassVar[tuple[type, ...]] = ()  # a method's own settings class (Coconut, iCoT)

    def __post_init__(self, inf_latent_iterations: int | None = None) -> None:
        CODIModelArguments.__post_init__(self, inf_latent_iterations)
        for part in (CODIDataArguments, *self.METHOD_PARTS):
            part.__post_init__(self)
        CODITrainingArguments.__post_init__(self)

    def part(self, cls: type) -> Any:
        """The settings of `cls` (`CODIModelArguments`, `CODIDataArguments`, a method's) as a `cls`."""
        return cls(**{f.name: getattr(self, f.name) for f in dataclasses.fields(cls) if f.init})

    def model_args(self) -> CODIModelArguments:
        return self.part(CODIModelArguments)

    def data_args(self) -> CODIDataArguments:
        return self.part(CODIDataArguments)

    def method_args(self) -> Any:
        """The method's own settings (`CoconutArguments`, `ICoTArguments`), or None."""
        return self.part(self.METHOD_PARTS[0]) if self.METHOD_PARTS else None

    @classmethod
    def from_parts(cls, *parts: Any, **overrides: Any) -> CODIConfig:
        """One config from separate argument objects (model, data, training, a method's), later ones
        winning, then `overrides`; a `cls` among them is copied, not rebuilt (its training settings stay
        as validated)."""
        whole = None if overrides else next((part for part in parts if isinstance(part, cls)), None)
        values = {}
        for part in parts:
            if part is not whole:
                values |= {f.name: getattr(part, f.name) for f in dataclasses.fields(part) if f.init}
        values |= overrides
        if whole is None:
            return cls(**values)
        config = copy.copy(whole)
        for name, value in values.items():
            setattr(config, name, value)
        return config


def parse_config(
    argv: list[str] | None = None,
    config_class: type | None = None,
    classes: Sequence[type] = ARGUMENT_CLASSES,
) -> Any:
    """As `parse_args`, into one `config_class` (default `CODIConfig`; e.g. `CoconutConfig`, with its
    arguments class added to `classes`)."""
    from .cli.args import parse_into

    config_class = config_class or CODIConfig

    argv = list(sys.argv[1:] if argv is None else argv)
    return parse_into(
        "codi train", classes, config_class, argv, aliases=ALIASES, description=TRAIN_DESCRIPTION
    )


COLUMNS = ("question", "cot", "answer")
# No-CoT-SFT trains on question + answer only: a dataset without CoTs is enough for it.
OPTIONAL = {"no_cot_sft": ("cot",)}


def is_rows(value: Any) -> bool:
    """A `datasets.Dataset`, or a list of dicts: rows to turn into records (not a built training set)."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return all(isinstance(row, Mapping) for row in value[:1])
    return hasattr(value, "column_names")  # a datasets.Dataset (or a DatasetDict, refused by name)


def _columns(rows: Any, name: str) -> list[str]:
    columns = getattr(rows, "column_names", None)
    if isinstance(columns, Mapping):  # a DatasetDict: {split: [columns]}
        splits = ", ".join(repr(split) for split in columns)
        raise DataError(f"{name}: a DatasetDict of splits {splits}; pass one split, e.g. dataset['train']")
    if columns is None:  # a list of dicts: the first row's keys (each row is checked below)
        columns = list(rows[0]) if len(rows) else []
    return list(columns)


def dataset_records(rows: Any, name: str, method: str = "codi") -> list[RawRecord]:
    """The records of a `datasets.Dataset` (or list of dicts) with question / cot / answer columns.

    Numbers are accepted as text (an answer column of ints), None as empty (the record is then dropped
    and counted, as from a file); other columns are ignored.
    """
    if not len(rows):
        raise DataError(f"{name}: the dataset has no rows")
    columns = _columns(rows, name)
    optional = OPTIONAL.get(method, ())
    for column in COLUMNS:
        if column not in columns and column not in optional:
            raise DataError(
                f"{name}: no column {column!r} (columns: {', '.join(columns) or 'none'}); "
                f"the trainers read {', '.join(COLUMNS)}"
            )
    records = []
    for index, row in enumerate(rows):
        where = f"{name}[{index}]"
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: expected a dict of columns, got {type(row).__name__}")
        values = []
        for column in COLUMNS:
            if column not in row and column not in optional:
                raise DataError(f"{where}: no column {column!r} (found {', '.join(map(str, row))})")
            value = row.get(column)
            if value is not None and not isinstance(value, (str, int, float)):
                raise DataError(f"{where}: column {column!r} must be text, got {type(value).__name__}")
            values.append("" if value is None else str(value))
        records.append(RawRecord(*values, where=where))
    return records


def model_arguments(model: Any, config) -> Any:
    """The model arguments to build from when `model` names one (hub id or folder), else None.

    `config.model_name_or_path` is set to the name too, so that the run record and the saved
    `codi_config.json` say which model was trained."""
    if model is None:
        return config.model_args()
    if isinstance(model, str):
        config.model_name_or_path = model
        return dataclasses.replace(config.model_args(), model_name_or_path=model)
    return None


def check_model(model: Any, cls: type, name: str) -> None:
    if not isinstance(model, cls):
        raise TypeError(
            f"{name}: model must be a hub id, a local folder or a {cls.__name__}, got {type(model).__name__}"
        )


def eval_items(rows: Any, name: str = "dataset") -> list:
    """`EvalItem`s of rows with question and answer columns (the gold: the answer, or its part after
    `####`, as a number), for `CODITrainer.evaluate_accuracy`."""
    from .data.eval_data import EvalItem, normalize_question
    from .inference.scoring import parse_gold

    records = dataset_records(rows, name, method="no_cot_sft")  # the CoT is not read
    return [EvalItem(normalize_question(r.question), parse_gold(r.answer, r.where), r.where) for r in records]


def train_source(data_args: CODIDataArguments) -> str:
    source = data_args.train_file or data_args.data_name
    if source is None:
        raise ValueError(
            "no training data: pass --train_file PATH or --data_name HUB_ID (or a train_dataset)"
        )
    return source


def eval_source(data_args: CODIDataArguments) -> str | None:
    return data_args.validation_file or (data_args.data_name if data_args.validation_split else None)


def build_datasets(
    model: CODIModel,
    data_args: CODIDataArguments,
    training_args: CODITrainingArguments,
    train_records: list | None = None,
    eval_records: list | None = None,
) -> tuple[CODIDataset, DataStats, CODIDataset | None, DataStats | None]:
    """Training and validation sets from `train_records` / `eval_records`, or else from the files or
    hub dataset that `data_args` names."""
    common = dict(
        bot_id=model.bot_id,
        eot_id=model.eot_id,
        method=training_args.method,
        cot_style=data_args.cot_style,
        include_last_cot=data_args.include_last_cot,
        max_token_num=data_args.max_token_num,
        skip_negative_answers=data_args.skip_negative_answers,
        answer_prompt=model.args.answer_prompt,
        step_targets=training_args.latent_step_loss_factor > 0,
        position_limit=max_positions(model.hf_model),
        num_latent=model.args.num_latent,
    )

    def build(records, max_samples, name):
        return build_dataset(records, model.tokenizer, max_samples=max_samples, name=name, **common)

    return build_splits(data_args, build, train_records, eval_records)


def build_splits(data_args: CODIDataArguments, build, train_records=None, eval_records=None) -> tuple:
    """`build(records, max_samples, name) -> (dataset, stats)` on the training records (given, or read from
    what `data_args` names; fingerprinted, so that a resume on other data is refused) and on the
    validation records when there are any: (train set, its stats, validation set or None, its stats)."""
    source_name = "train_dataset" if train_records is not None else train_source(data_args)
    if train_records is None:
        train_records = load_records(source_name, "train")
    train_set, train_stats = build(train_records, data_args.max_train_samples, "train")
    train_stats.fingerprint = records_fingerprint(source_name, train_records[: train_stats.read])
    source = eval_source(data_args)
    if eval_records is None and source is not None:
        eval_records = load_records(source, data_args.validation_split or "validation")
    if eval_records is None:
        return train_set, train_stats, None, None
    return (train_set, train_stats, *build(eval_records, data_args.max_eval_samples, "validation"))

"""Evaluation sets (docs/method.md#evaluation): GSM8k test, SVAMP, GSM-Hard, MultiArith, CommonsenseQA-CoT, GSM8k-Aug.

Each set loads from its hub id (needs network or the HF cache) or from the plain file copies in a data
directory (`--data_dir`, file names in `EVAL_SETS`). Questions are normalised as the reference does (`strip()`, double
spaces collapsed once) and gold answers become floats (commas removed, the part after `####`), or an
upper-case letter for CommonsenseQA.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..inference.scoring import ANSWER_PROMPT, parse_gold
from .records import DataError, load_hub_dataset, named_decode_errors, parse_icot_line, read_json_rows

logger = logging.getLogger(__name__)


@dataclass
class EvalItem:
    """One evaluation question. gold: float (numeric sets), a letter (choice sets) or None (unreadable)."""

    question: str
    gold: float | str | None
    where: str = ""


@dataclass(frozen=True)
class EvalSetSpec:
    """Where a benchmark lives and how one of its rows becomes an `EvalItem`."""

    name: str
    filename: str  # plain-file copy inside a data directory
    hub_id: str
    hub_splits: tuple[str, ...]  # concatenated in this order
    row: Callable[[dict, str], EvalItem]
    hub_config: str | None = None
    answer_kind: str = "number"  # "number" or "choice"
    description: str = ""


def normalize_question(question: str) -> str:
    """The reference's normalisation: `question.strip().replace("  ", " ")`."""
    return question.strip().replace("  ", " ")


def _field(row: dict, where: str, *names: str):
    for name in names:
        if name in row and row[name] is not None:
            return row[name]
    found = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise DataError(f"{where}: expected one of the fields {list(names)}; found {found}")


def _item(question, gold, where: str) -> EvalItem:
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: empty or non-text question")
    return EvalItem(normalize_question(question), parse_gold(gold, where), where)


def _row_gsm8k(row: dict, where: str) -> EvalItem:
    return _item(_field(row, where, "question"), _field(row, where, "answer"), where)


def _row_svamp(row: dict, where: str) -> EvalItem:
    question = row.get("question_concat")  # the hub copy's ready-made "Body Question"
    if not question:
        question = f"{_field(row, where, 'Body')} {_field(row, where, 'Question')}"
    return _item(question, _field(row, where, "Answer"), where)


def _row_gsm_hard(row: dict, where: str) -> EvalItem:
    return _item(_field(row, where, "input", "instruction"), _field(row, where, "target", "response"), where)


def _row_multiarith(row: dict, where: str) -> EvalItem:
    question = _field(row, where, "sQuestion", "question")
    if "lSolutions" in row:
        solutions = row["lSolutions"]
        if not isinstance(solutions, list) or not solutions:
            raise DataError(f"{where}: lSolutions must be a non-empty list")
        return _item(question, solutions[0], where)
    return _item(question, _field(row, where, "final_ans"), where)


def _row_gsm8k_aug(row: dict, where: str) -> EvalItem:
    return _item(_field(row, where, "question"), _field(row, where, "answer"), where)


def _row_commonsense(row: dict, where: str) -> EvalItem:
    answer = str(_field(row, where, "answer")).rpartition("####")[2].strip()
    answer = answer.removeprefix(ANSWER_PROMPT).strip()
    gold = answer[:1].upper() if answer[:1].upper() in "ABCDE" and answer else None
    if gold is None:
        logger.warning("%s: gold answer %r is not a choice letter A-E", where, answer)
    question = _field(row, where, "question")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: empty or non-text question")
    return EvalItem(normalize_question(question), gold, where)


EVAL_SETS: dict[str, EvalSetSpec] = {
    spec.name: spec
    for spec in (
        EvalSetSpec(
            "gsm8k", "gsm8k_test.jsonl", "gsm8k", ("test",), _row_gsm8k, "main", "number", "GSM8k test (1319)"
        ),
        EvalSetSpec(
            "svamp",
            "svamp.json",
            "ChilleD/SVAMP",
            ("train", "test"),
            _row_svamp,
            description="SVAMP, all 1000 items (hub train + test, as the reference)",
        ),
        EvalSetSpec(
            "gsm-hard",
            "gsm_hard.jsonl",
            "juyoung-trl/gsm-hard",
            ("train",),
            _row_gsm_hard,
            description="GSM-Hard (1319)",
        ),
        EvalSetSpec(
            "multiarith",
            "multiarith.json",
            "ChilleD/MultiArith",
            ("train", "test"),
            _row_multiarith,
            description="MultiArith, all 600 items",
        ),
        EvalSetSpec(
            "multiarith-test",
            "multiarith_test.json",
            "ChilleD/MultiArith",
            ("test",),
            _row_multiarith,
            description="MultiArith hub test split (180), what the reference scores",
        ),
        EvalSetSpec(
            "gsm8k-aug",
            "gsm8k_aug_test.txt",
            "zen-E/GSM8k-Aug",
            ("test",),
            _row_gsm8k_aug,
            description="GSM8k-Aug test (= GSM8k test questions, 1319)",
        ),
        EvalSetSpec(
            "gsm8k-aug-valid",
            "gsm8k_aug_valid.txt",
            "whynlp/gsm8k-aug",
            ("validation",),
            _row_gsm8k_aug,
            description="GSM8k-Aug validation (500): checkpoint selection",
        ),
        EvalSetSpec(
            "commonsense",
            "commonsense_validation.jsonl",
            "zen-E/CommonsenseQA-GPT4omini",
            ("validation",),
            _row_commonsense,
            answer_kind="choice",
            description="CommonsenseQA-CoT validation (letters A-E)",
        ),
    )
}
ALIASES = {
    "gsm8k-test": "gsm8k",
    "gsm_hard": "gsm-hard",
    "gsmhard": "gsm-hard",
    "multi-arith": "multiarith",
    "multi_arith": "multiarith",
    "gsm8k_aug": "gsm8k-aug",
    "icot": "gsm8k-aug",
    "commonsenseqa": "commonsense",
    "commonsense-qa": "commonsense",
}


def eval_set_spec(name: str) -> EvalSetSpec:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {name!r}; known: {', '.join(EVAL_SETS)}")
    return EVAL_SETS[key]


def _read_rows(path: str) -> list[tuple[dict, str]]:
    """Rows of a `.jsonl`, `.json` (array) or ICoT `.txt` file, each with its file:line / file[index]."""
    rows: list[tuple[dict, str]] = []
    if path.endswith(".txt"):
        with open(path, encoding="utf-8-sig") as handle, named_decode_errors(path):
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    where = f"{path}:{number}"
                    record = parse_icot_line(line.rstrip("\n"), where)
                    rows.append(({"question": record.question, "answer": record.answer}, where))
    elif path.endswith((".jsonl", ".json")):
        rows = read_json_rows(path)
    else:
        raise DataError(f"{path}: unknown format (expected .jsonl, .json or .txt)")
    return rows


def load_eval_set(name: str, path: str | None = None, limit: int | None = None) -> list[EvalItem]:
    """Items of benchmark `name`, in file order, the first `limit` of them when given.

    path: None -> the hub id (docs/method.md#evaluation); a directory -> its plain-file copy (e.g. `svamp.json`); a file
    -> that file, read with `name`'s field layout.
    """
    spec = eval_set_spec(name)
    if path is not None:
        file_path = os.path.join(path, spec.filename) if os.path.isdir(path) else path
        if not os.path.isfile(file_path):
            raise FileNotFoundError(
                f"evaluation set {spec.name!r}: file not found: {file_path} "
                f"(expected {spec.filename} in the data directory, or drop --data_dir to use the hub id "
                f"{spec.hub_id})"
            )
        rows = _read_rows(file_path)
        if not rows:
            raise DataError(f"{file_path}: no items (the file is empty or holds only blank lines / [])")
    else:
        rows = _hub_rows(spec)
    if limit is not None:
        rows = rows[: max(limit, 0)]
    items = []
    for row, where in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        items.append(spec.row(row, where))
    unreadable = sum(item.gold is None for item in items)
    logger.info(
        "%s: %d items from %s (%d without a readable gold answer)",
        spec.name,
        len(items),
        path or spec.hub_id,
        unreadable,
    )
    return items


def _hub_rows(spec: EvalSetSpec) -> list[tuple[dict, str]]:
    rows = []
    for split in spec.hub_splits:
        config = (spec.hub_config,) if spec.hub_config else ()
        dataset = load_hub_dataset(spec.hub_id, *config, split=split)
        rows.extend((dict(row), f"{spec.hub_id}[{split}][{index}]") for index, row in enumerate(dataset))
    return rows

"""Reading training records: ICoT text files, JSONL/JSON ({question, cot, answer} or GSM8k), hub datasets.

Every record keeps where it came from (`file:line`, `dataset[split][index]`), and every error names it.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..io import hub

logger = logging.getLogger(__name__)

HUB_ALIASES = {
    "icot": "zen-E/GSM8k-Aug",
    "icot-full": "zen-E/GSM8k-Aug-NL",
    "commonsense": "zen-E/CommonsenseQA-GPT4omini",
}
_GSM8K_ANNOTATION = re.compile(r"<<([^<>]*)>>")


class DataError(ValueError):
    """A record that cannot be read; the message names the source and the line or index."""


@contextmanager
def named_decode_errors(path: str) -> Iterator[None]:
    """Turn a `UnicodeDecodeError` while reading `path` into a DataError naming the file and line."""
    try:
        yield
    except UnicodeDecodeError as error:
        raise decode_error(path, error) from error


def decode_error(path: str, error: UnicodeDecodeError) -> DataError:
    """`path:line: not UTF-8 ...`. The error's offset is relative to the chunk the reader decoded, so
    the whole file is decoded once more to find the absolute byte offset, hence the line."""
    with open(path, "rb") as handle:
        raw = handle.read()
    offset = error.start
    try:
        raw.decode("utf-8-sig")
    except UnicodeDecodeError as whole:
        offset = whole.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
    line = raw.count(b"\n", 0, offset) + 1
    column = offset - raw.rfind(b"\n", 0, offset)
    byte = raw[offset : offset + 1].hex() or "??"
    return DataError(
        f"{path}:{line}: not UTF-8 text (byte 0x{byte} at byte {column} of the line); re-encode the file "
        "as UTF-8, e.g. `iconv -f latin1 -t utf-8 OLD > NEW`"
    )


@dataclass
class RawRecord:
    """One training record as read from its source; `where` names the file:line or dataset:index."""

    question: str
    cot: str
    answer: str
    where: str = ""


def _require(record: dict, keys: Sequence[str], where: str) -> list[str]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in keys if key not in record]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing}; found {sorted(record)}")
    values = []
    for key in keys:
        value = record[key]
        if value is None:
            # GSM8k-Aug-NL has records without an answer: the reference skips them; so do we, counted
            # as an empty answer by build_dataset, instead of failing on the whole dataset.
            value = ""
        if not isinstance(value, (str, int, float)):
            raise DataError(f"{where}: field {key!r} must be text, got {type(value).__name__}")
        values.append(str(value))
    return values


def parse_icot_line(line: str, where: str) -> RawRecord:
    """`question||step step step #### answer` (the ICoT / GSM8k-Aug text format)."""
    if "||" not in line:
        raise DataError(f"{where}: expected 'question||cot #### answer', found no '||'")
    question, _, rest = line.partition("||")
    if "####" not in rest:
        raise DataError(f"{where}: expected '#### answer' after the CoT, found none")
    cot, _, answer = rest.rpartition("####")
    if not question.strip() or not answer.strip():
        raise DataError(f"{where}: empty question or answer")
    return RawRecord(question.strip(), cot.strip(), answer.strip(), where)


def gsm8k_to_record(question: str, solution: str, where: str) -> RawRecord:
    """Original GSM8k: the CoT is the `<<...>>` annotations joined by spaces; the answer follows `####`."""
    if "####" not in solution:
        raise DataError(f"{where}: GSM8k answer has no '#### N' line")
    steps = _GSM8K_ANNOTATION.findall(solution)
    answer = solution.rpartition("####")[2].strip()
    return RawRecord(question.strip(), " ".join(f"<<{step}>>" for step in steps), answer, where)


# The keys a training record may have: {question, cot, answer}, whynlp/gsm8k-aug's {question, steps,
# answer}, or GSM8k's {question, answer} (its CoT is the answer's <<...>> annotations).
RECORD_KEYS = ("question", "cot", "answer", "steps")


def check_record_keys(record: object, where: str) -> None:
    """A local record's keys must be known: a misspelt CoT key (`CoT`, `chain_of_thought`) would
    otherwise read as a GSM8k row whose CoT is empty, and train with no chain of thought."""
    if not isinstance(record, dict):
        return  # `_require` names the type
    for key in record:
        if key not in RECORD_KEYS:
            close = difflib.get_close_matches(str(key).lower(), RECORD_KEYS, n=1, cutoff=0.5)
            hint = f" Did you mean: {close[0]}?" if close else ""
            raise DataError(
                f"{where}: unknown key {key!r}.{hint} A record has the keys question, cot, answer "
                "(or question, steps, answer; or GSM8k's question, answer with <<...>> annotations)"
            )


def _json_record(record: dict, where: str) -> RawRecord:
    if isinstance(record, dict) and "cot" not in record and isinstance(record.get("steps"), list):
        # whynlp/gsm8k-aug: the CoT is a list of steps ("<<600*30/100=180>>", ...), the answer bare.
        question, answer = _require(record, ("question", "answer"), where)
        return RawRecord(question, " ".join(str(step) for step in record["steps"]), answer, where)
    if isinstance(record, dict) and "cot" not in record and "question" in record and "answer" in record:
        question, solution = _require(record, ("question", "answer"), where)
        return gsm8k_to_record(question, solution, where)
    question, cot, answer = _require(record, ("question", "cot", "answer"), where)
    return RawRecord(question, cot, answer, where)


def read_json_rows(path: str) -> list[tuple[object, str]]:
    """Items of a `.jsonl` file or a `.json` array, each with where it stands (`file:line` / `file[i]`)."""
    if path.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8-sig") as handle, named_decode_errors(path):
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    rows.append((json.loads(line), where))
                except json.JSONDecodeError as error:
                    raise DataError(f"{where}: invalid JSON: {error.msg}") from error
                except RecursionError:
                    raise DataError(f"{where}: JSON nested too deeply to read") from None
        return rows
    with open(path, encoding="utf-8-sig") as handle, named_decode_errors(path):
        try:
            items = json.load(handle)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from error
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON array of records")
    return [(item, f"{path}[{index}]") for index, item in enumerate(items)]


def read_records(path: str) -> list[RawRecord]:
    """Read a local file: ICoT `.txt`, `.jsonl` ({question, cot, answer} or GSM8k), or a `.json` array.
    UTF-8 (a byte-order mark is allowed); an empty file is an error naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if path.endswith(".txt"):
        with open(path, encoding="utf-8-sig") as handle, named_decode_errors(path):
            records = [
                parse_icot_line(line.rstrip("\n"), f"{path}:{number}")
                for number, line in enumerate(handle, start=1)
                if line.strip()
            ]
    elif path.endswith((".jsonl", ".json")):
        rows = read_json_rows(path)
        for item, where in rows:
            check_record_keys(item, where)
        records = [_json_record(item, where) for item, where in rows]
    else:
        raise DataError(f"{path}: unknown data format (expected .txt, .jsonl or .json)")
    if not records:
        raise DataError(f"{path}: no records (the file is empty or holds only blank lines / an empty array)")
    return records


def load_hub_records(name: str, split: str = "train") -> list[RawRecord]:
    """Records of a hub dataset with `question`, `cot`, `answer` columns (needs network or the HF cache)."""
    dataset_id = HUB_ALIASES.get(name, name)
    dataset = load_hub_dataset(dataset_id, split=split)
    return [_json_record(dict(row), f"{dataset_id}[{split}][{index}]") for index, row in enumerate(dataset)]


def load_hub_dataset(dataset_id: str, *config: str, split: str):
    """`datasets.load_dataset` after one hub reachability check (codi.io.hub): when the hub is unreachable,
    from the cache at once, or one line naming the dataset instead of a minute of retries."""
    hub.prepare_hub_access(dataset_id)
    import datasets

    try:
        return datasets.load_dataset(dataset_id, *config, split=split)
    except (ConnectionError, FileNotFoundError) as error:
        if hub.offline_reason():
            raise hub.OfflineError(hub.offline_message("dataset", dataset_id)) from error
        raise


def load_records(source: str, split: str = "train") -> list[RawRecord]:
    """A local file path, or else a hub dataset id / reference alias."""
    if os.path.exists(source) or source.endswith((".txt", ".jsonl", ".json")):
        return read_records(source)
    return load_hub_records(source, split)


@dataclass
class DataStats:
    """How many records were read, kept and dropped by reason, and kept but flagged (e.g. non-numeric
    answers), each reason with the first record it applied to."""

    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    flagged: Counter = field(default_factory=Counter)
    first_dropped: dict[str, str] = field(default_factory=dict)
    first_flagged: dict[str, str] = field(default_factory=dict)
    fingerprint: dict | None = None  # of the records read for training (codi.run_safety)

    def log(self, name: str, log: logging.Logger = logger) -> None:
        """One INFO line of counts (each drop reason with its first record), one WARNING per flag."""
        reasons = ", ".join(
            f"{reason}: {count} (first: {self.first_dropped.get(reason, '?')})"
            for reason, count in sorted(self.dropped.items())
        )
        log.info("%s: read %d records, kept %d, dropped %s", name, self.read, self.kept, reasons or "none")
        for reason, count in sorted(self.flagged.items()):
            log.warning(
                "%s: %d kept record(s) flagged %s (first: %s)",
                name,
                count,
                reason,
                self.first_flagged[reason],
            )

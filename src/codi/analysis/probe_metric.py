"""The probe's records and the paper's Table-3 metric: do the decoded latents hold the CoT's results?

A record holds, for one question, the top-k tokens decoded at `<bot>` and after each latent thought
(`codi.analysis.probe` fills it; `codi.report` draws it). A top-k token matches a step result `c` of the
reference CoT's steps `<<a op b=c>>` (all steps of the FULL CoT, the last included) when

    whole        its stripped text, commas removed, is a number equal to the result (".5" == "0.5"), or
    first token  its stripped text equals the first token of the result's own tokenisation (multi-token
                 numbers, e.g. GPT-2's "18" of "1800"; Llama-3's 3-digit groups), only when that first
                 token contains a digit (so "-" of "-5" never matches).

"any order": every result matches at some position; "in order": the results match at strictly
increasing positions, step 1 first. Rates are bucketed by 1, 2 and 3+ steps.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from ..inference.scoring import as_number

STEP_PATTERN = re.compile(r"<<([^<>]*)>>")
BUCKETS = ("1", "2", "3+")
RULES = ("first_token", "whole")


# --------------------------------------------------------------------------------------------------
# Records


@dataclass
class TopK:
    """The k most probable tokens of one softmax, most probable first."""

    tokens: list[str]
    ids: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)


@dataclass
class PositionProbe:
    """One probed position: 0 = after `<bot>`, i = after latent thought i.

    top: LM head on the last-layer state before the projection. projected: on the latent fed next
    (None at the last position, whose latent is never computed). lens: one TopK per `hidden_states`
    entry (layer 0 = embeddings). hidden_norm / latent_norm: L2 norms of those vectors.
    """

    position: int
    top: TopK
    projected: TopK | None = None
    lens: list[TopK] | None = None
    hidden_norm: float | None = None
    latent_norm: float | None = None

    @property
    def label(self) -> str:
        return "<bot>" if self.position == 0 else f"latent {self.position}"


@dataclass
class StepRef:
    """One reference CoT step `<<expression>>`: its result `c` and that result's first token(s)."""

    expression: str
    result: str
    first_pieces: list[str] = field(default_factory=list)


@dataclass
class ProbeRecord:
    """Everything probed for one question (one JSONL line)."""

    question: str
    positions: list[PositionProbe]
    steps: list[StepRef] = field(default_factory=list)
    index: int = 0
    cot: str = ""
    gold: str | None = None
    predicted_text: str | None = None
    predicted: float | None = None
    correct: bool | None = None
    latent_cosine: list[list[float]] = field(default_factory=list)  # (num_latent, num_latent)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ProbeRecord:
        def topk(value):
            return None if value is None else TopK(**value)

        positions = [
            PositionProbe(
                position=p["position"],
                top=TopK(**p["top"]),
                projected=topk(p.get("projected")),
                lens=None if p.get("lens") is None else [TopK(**t) for t in p["lens"]],
                hidden_norm=p.get("hidden_norm"),
                latent_norm=p.get("latent_norm"),
            )
            for p in data["positions"]
        ]
        values = {key: value for key, value in data.items() if key not in ("positions", "steps")}
        return cls(positions=positions, steps=[StepRef(**s) for s in data.get("steps", [])], **values)


# --------------------------------------------------------------------------------------------------
# Reference steps and the number-matching rule


def first_pieces(tokenizer, result: str) -> list[str]:
    """The stripped first token of `result` tokenised bare and after a space, when it holds a digit."""
    pieces = []
    for variant in (result, " " + result):
        ids = tokenizer(variant, add_special_tokens=False)["input_ids"]
        texts = [tokenizer.decode([token]).strip() for token in ids]
        first = next((text for text in texts if text), "")
        if any(ch.isdigit() for ch in first) and first not in pieces:
            pieces.append(first)
    return pieces


def reference_steps(cot: str, tokenizer=None) -> list[StepRef]:
    """Steps `<<a op b=c>>` of a CoT with their results `c` (steps without '=' are skipped)."""
    steps = []
    for expression in STEP_PATTERN.findall(cot or ""):
        if "=" not in expression:
            continue
        result = expression.rpartition("=")[2].strip().replace(",", "")
        if result:
            pieces = first_pieces(tokenizer, result) if tokenizer is not None else []
            steps.append(StepRef(expression, result, pieces))
    return steps


def token_matches(token: str, step: StepRef, rule: str = "first_token") -> bool:
    """Whether one decoded token stands for the step's result under `rule` (module docstring)."""
    text = token.strip().replace(",", "")
    if not text:
        return False
    value, target = as_number(text), as_number(step.result)
    if value is not None and target is not None:
        if abs(value - target) <= 1e-6 * max(1.0, abs(target)):
            return True
    elif text == step.result:
        return True
    return rule == "first_token" and text in step.first_pieces


def _source(position: PositionProbe, source: str) -> TopK | None:
    return position.top if source == "top" else position.projected


def step_positions(record: ProbeRecord, rule: str = "first_token", source: str = "top") -> list[list[int]]:
    """For each reference step, the positions whose top-k (of `source`) contain its result."""
    found = []
    for step in record.steps:
        hits = []
        for position in record.positions:
            topk = _source(position, source)
            if topk is not None and any(token_matches(token, step, rule) for token in topk.tokens):
                hits.append(position.position)
        found.append(hits)
    return found


def match_steps(record: ProbeRecord, rule: str = "first_token", source: str = "top") -> tuple[bool, bool]:
    """(in_order, any_order) for one record; both False when it has no steps."""
    found = step_positions(record, rule, source)
    if not found:
        return False, False
    any_order = all(found)
    last, in_order = -1, any_order
    for hits in found:  # greedy earliest match decides whether an increasing choice exists
        later = [position for position in hits if position > last]
        if not later:
            in_order = False
            break
        last = later[0]
    return in_order, any_order


def bucket(num_steps: int) -> str:
    return "0" if num_steps == 0 else ("3+" if num_steps >= 3 else str(num_steps))


# --------------------------------------------------------------------------------------------------
# Summary (paper Table 3 and latent geometry)


def _rates(records: list[ProbeRecord], rule: str, source: str) -> dict[str, dict]:
    """Table 3: per bucket (and "all" with >= 1 step) the count and the in-order / any-order shares."""
    groups: dict[str, list[tuple[bool, bool]]] = {name: [] for name in (*BUCKETS, "all")}
    for record in records:
        if record.num_steps:
            result = match_steps(record, rule, source)
            groups[bucket(record.num_steps)].append(result)
            groups["all"].append(result)
    table = {}
    for name, results in groups.items():
        n = len(results)
        table[name] = {
            "n": n,
            "in_order": sum(r[0] for r in results) / n if n else None,
            "any_order": sum(r[1] for r in results) / n if n else None,
        }
    return table


def _mean(rows: list[list[float]]) -> list[float]:
    return [round(sum(column) / len(column), 5) for column in zip(*rows)] if rows else []


def summarize(records: Sequence[ProbeRecord]) -> dict:
    """Aggregate metrics: Table-3 match rates (both rules; after the projection when probed), accuracy,
    mean top-1 probability and hidden norm per position, mean latent norms and cosine matrix."""
    records = list(records)
    num_latent = Counter(len(r.latent_cosine) for r in records).most_common(1)[0][0] if records else 0
    same = [r for r in records if len(r.latent_cosine) == num_latent and len(r.positions) == num_latent + 1]
    scored = [r for r in records if r.correct is not None]
    summary: dict = {
        "num_questions": len(records),
        "num_latent": num_latent,
        "top_k": max((len(p.top.tokens) for r in records for p in r.positions), default=0),
        "steps_histogram": dict(sorted(Counter(bucket(r.num_steps) for r in records).items())),
        "accuracy": sum(r.correct for r in scored) / len(scored) if scored else None,
        "match_rule": "first_token: a top-k token equals the result as a number, or the first token "
        "of the result's tokenisation; whole: as a number only",
        "table3": {rule: _rates(records, rule, "top") for rule in RULES},
    }
    if records and all(p.projected is not None for r in records for p in r.positions[:-1]):
        summary["table3_after_projection"] = {rule: _rates(records, rule, "projected") for rule in RULES}
    summary["top1_prob_mean"] = _mean([[p.top.probs[0] for p in r.positions] for r in same])
    summary["hidden_norm_mean"] = _mean([[p.hidden_norm or 0.0 for p in r.positions] for r in same])
    summary["latent_norm_mean"] = _mean([[p.latent_norm or 0.0 for p in r.positions[:-1]] for r in same])
    summary["latent_cosine_mean"] = [
        _mean([r.latent_cosine[i] for r in same]) for i in range(num_latent) if same
    ]
    return summary


def write_jsonl(records: Sequence[ProbeRecord], path: str) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str) -> list[ProbeRecord]:
    """Records written by `codi.report.write_report` (probe_records.jsonl), e.g. for a notebook."""
    with open(path, encoding="utf-8") as handle:
        return [ProbeRecord.from_dict(json.loads(line)) for line in handle if line.strip()]

"""Synthetic GSM8k-Aug-style data: templated multi-step word problems with equation CoTs.

Every record has a word-problem `question`, a CoT in exactly the GSM8k-Aug format (equation steps
separated by one space, `<<(3+4)%10=7>> <<(7*2)%10=4>>`) and an answer `#### N`. The problem is a chain:
a start value followed by `steps` operations (`+ k`, `- k`, `* k`, `/ k`), optionally reduced modulo
`modulus` after every step (`modulus=None`: plain GSM-style arithmetic, multi-digit values). The
default (mod 10, `+`/`*`, 3 steps) is a family whose steps do not commute, so the answer needs the
intermediate values: a tiny model trained without a CoT stays near 20-30% (docs/demo.md).

    codi data synth --out data/synth --n_train 20000 --seed 0
    from codi.data.synth import SynthConfig, make_splits

Splits are disjoint by the underlying problem (start value and operations), not only by wording, so
test accuracy measures generalisation and not a memorised problem under another name.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field

OPERATORS = ("+", "-", "*", "/")
SPLITS = ("train", "validation", "test")
_STEP = re.compile(r"^<<([^<>=]+)=(-?\d+)>>$")

# Wording per operator; the operand is the only number in each phrase.
_PHRASES = {
    "+": ("adds {k}", "adds {k} more", "puts in {k} more"),
    "-": ("takes away {k}", "removes {k}", "gives away {k}"),
    "*": ("multiplies it by {k}", "makes it {k} times as many", "multiplies the count by {k}"),
    "/": ("splits it into {k} equal parts and keeps one", "divides it by {k}"),
}
_SHORT = {"+": "add {k}", "-": "subtract {k}", "*": "multiply by {k}", "/": "divide by {k}"}
# one word per operator: every step of a "uniform" question has the same number of tokens
_UNIFORM = {"+": "plus {k}", "-": "minus {k}", "*": "times {k}", "/": "over {k}"}
WORDINGS = ("varied", "fixed", "uniform")
_NAMES = ("Ann", "Ben", "Cara", "Dan", "Eve", "Finn", "Gina", "Hugo", "Iris", "Jack", "Kim", "Leo")
_ORDINALS = ("First", "Second", "Third", "Fourth", "Fifth", "Sixth", "Seventh", "Eighth")
_THINGS = ("apples", "coins", "marbles", "stamps", "shells", "cards", "beads", "books")


@dataclass
class SynthConfig:
    """What to generate. `operand_max` bounds every operand; `value_max` bounds intermediate values
    when there is no modulus (operands that would exceed it are re-drawn). `invertible` (with a
    modulus) draws only multipliers coprime with it (3, 7, 9 mod 10), so every step is a bijection:
    no step loses information, and the answer cannot be guessed from part of the chain (with `* 2`
    or `* 5` mod 10 many chains collapse to a few values)."""

    n_train: int = field(default=20000, metadata={"help": "Training records."})
    n_validation: int = field(default=500, metadata={"help": "Validation records."})
    n_test: int = field(default=1000, metadata={"help": "Test records."})
    min_steps: int = field(default=3, metadata={"help": "Fewest operations per problem."})
    max_steps: int = field(default=3, metadata={"help": "Most operations per problem (at most 8)."})
    operators: str = field(default="+*", metadata={"help": "Operators drawn, a subset of '+-*/'."})
    modulus: int | None = field(
        default=10, metadata={"help": "Reduce every value modulo this (0 or None: plain arithmetic)."}
    )
    start_max: int = field(default=9, metadata={"help": "Largest start value."})
    operand_max: int = field(default=9, metadata={"help": "Largest operand."})
    value_max: int = field(default=999, metadata={"help": "Largest intermediate value without a modulus."})
    wording: str = field(default="varied", metadata={"help": f"Question wording: {' | '.join(WORDINGS)}."})
    invertible: bool = field(
        default=False, metadata={"help": "Multipliers coprime with the modulus only (bijective steps)."}
    )
    train_min_steps: int | None = field(
        default=None, metadata={"help": "Also shorter chains (down to this) in the training split."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed."})
    splits: tuple[str, ...] = field(default=SPLITS, repr=False, init=False)

    def __post_init__(self) -> None:
        if self.modulus == 0:  # the command line's spelling of "no modulus"
            self.modulus = None
        unknown = set(self.operators) - set(OPERATORS)
        if not self.operators or unknown:
            raise ValueError(
                f"operators must be a non-empty subset of {''.join(OPERATORS)}, got {self.operators!r}"
            )
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.modulus is not None and self.modulus < 2:
            raise ValueError(f"modulus must be >= 2 or None, got {self.modulus}")
        if self.operand_max < 2 or self.start_max < 1:
            raise ValueError("operand_max must be >= 2 and start_max >= 1")
        if self.train_min_steps is not None and not 1 <= self.train_min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= train_min_steps <= max_steps, got {self.train_min_steps}")
        if self.invertible and self.modulus is None:
            raise ValueError("invertible needs a modulus (it keeps the multipliers coprime with it)")
        if self.wording not in WORDINGS:
            raise ValueError(f"wording must be one of {' | '.join(WORDINGS)}, got {self.wording!r}")
        if self.max_steps > len(_ORDINALS):
            raise ValueError(f"at most {len(_ORDINALS)} steps are supported, got {self.max_steps}")
        if self.modulus is not None and not any(self._has_modular_operand(op) for op in self.operators):
            # `_draw_step` would return None for every operator and `draw_problem` would retry forever.
            raise ValueError(
                f"operators {self.operators!r} have no valid operand with modulus {self.modulus}"
                + (" and invertible multipliers" if self.invertible else "")
                + " (modular division is not drawn); add + or -"
            )
        if min(self.n_train, self.n_validation, self.n_test) < 0:
            raise ValueError("split sizes must be >= 0")

    def _has_modular_operand(self, op: str) -> bool:
        return bool(_modular_operands(op, self))


@dataclass(frozen=True)
class Problem:
    """A start value and its operations; `values[i]` is the value after step i (values[0] = start)."""

    start: int
    ops: tuple[tuple[str, int], ...]
    values: tuple[int, ...]

    @property
    def answer(self) -> int:
        return self.values[-1]


def apply(value: int, op: str, operand: int, modulus: int | None) -> int:
    """One step; division is exact by construction."""
    if op == "+":
        result = value + operand
    elif op == "-":
        result = value - operand
    elif op == "*":
        result = value * operand
    else:
        result = value // operand
    return result % modulus if modulus else result


def _draw_step(rng: random.Random, value: int, config: SynthConfig) -> tuple[str, int] | None:
    """An operation valid from `value`, or None when the drawn operator has no valid operand."""
    op = rng.choice(config.operators)
    if config.modulus is not None:
        candidates = _modular_operands(op, config)
        return (op, rng.choice(candidates)) if candidates else None
    candidates = _operands(op, config)
    if op == "-":
        candidates = [k for k in candidates if k <= value]  # keep values non-negative
    elif op == "/":
        candidates = [k for k in candidates if value % k == 0 and value > 0]
    else:
        candidates = [k for k in candidates if apply(value, op, k, None) <= config.value_max]
    return (op, rng.choice(candidates)) if candidates else None


def _operands(op: str, config: SynthConfig) -> list[int]:
    low = 2 if op in "*/" else 1  # times/divide by 1 would be a no-op step
    return list(range(low, config.operand_max + 1))


def _modular_operands(op: str, config: SynthConfig) -> list[int]:
    """The operands `op` may take under the modulus (any start value): none for division, which is
    not an integer operation; only multipliers coprime with the modulus when `invertible`."""
    if op == "/":
        return []
    candidates = _operands(op, config)
    if op == "*" and config.invertible:
        candidates = [k for k in candidates if math.gcd(k, config.modulus) == 1]
    return candidates


def draw_problem(rng: random.Random, config: SynthConfig, min_steps: int | None = None) -> Problem:
    steps = rng.randint(config.min_steps if min_steps is None else min_steps, config.max_steps)
    while True:
        start = rng.randint(0, config.start_max)
        values, ops = [start], []
        for _ in range(steps):
            step = _draw_step(rng, values[-1], config)
            if step is None:
                break
            ops.append(step)
            values.append(apply(values[-1], *step, config.modulus))
        if len(ops) == steps:
            return Problem(start, tuple(ops), tuple(values))


def equation(value: int, op: str, operand: int, result: int, modulus: int | None) -> str:
    """One GSM8k-Aug step. Parentheses make `-`/`+` bind before `%` so the step evaluates to `result`."""
    if modulus:
        return f"<<({value}{op}{operand})%{modulus}={result}>>"
    return f"<<{value}{op}{operand}={result}>>"


def cot_of(problem: Problem, modulus: int | None) -> str:
    return " ".join(
        equation(value, op, operand, result, modulus)
        for value, (op, operand), result in zip(problem.values, problem.ops, problem.values[1:])
    )


def question_of(problem: Problem, modulus: int | None, rng: random.Random, wording: str = "varied") -> str:
    """The word problem. "fixed" wording is short and uses one phrase per operator (cheaper and easier
    to learn from scratch); "uniform" is "fixed" with a one-word phrase per operator ("times 8" for
    "multiply by 8"), so every question with the same number of steps has the same length and layout
    under a word-level tokenizer, the i-th step always at the same position; "varied" draws names,
    objects and phrasings."""
    if wording in ("fixed", "uniform"):
        phrases = _SHORT if wording == "fixed" else _UNIFORM
        opening = "A counter keeps only the last digit." if modulus else "A box holds coins."
        parts = [f"{opening} It starts at {problem.start}."]
        for index, (op, operand) in enumerate(problem.ops):
            parts.append(f"{_ORDINALS[index]}, {phrases[op].format(k=operand)}.")
        parts.append("What is it now?")
        return " ".join(parts)
    name, things = rng.choice(_NAMES), rng.choice(_THINGS)
    if modulus:
        opening = (
            f"{name} has a counter of {things} that keeps only the last digit. It shows {problem.start}."
        )
        closing = "What does the counter show now?"
    else:
        opening = f"{name} has {problem.start} {things}."
        closing = f"How many {things} does {name} have now?"
    parts = [opening]
    for index, (op, operand) in enumerate(problem.ops):
        parts.append(f"{_ORDINALS[index]}, {name} {rng.choice(_PHRASES[op]).format(k=operand)}.")
    parts.append(closing)
    return " ".join(parts)


def make_record(problem: Problem, config: SynthConfig, rng: random.Random) -> dict[str, str]:
    return {
        "question": question_of(problem, config.modulus, rng, config.wording),
        "cot": cot_of(problem, config.modulus),
        "answer": f"#### {problem.answer}",
    }


def make_splits(config: SynthConfig) -> dict[str, list[dict[str, str]]]:
    """Records per split; no underlying problem (start value and operations) occurs in two splits.

    With `train_min_steps`, the training split also holds shorter chains (an easy-to-hard mix);
    validation and test keep `min_steps`..`max_steps`."""
    rng = random.Random(config.seed)
    sizes = {"train": config.n_train, "validation": config.n_validation, "test": config.n_test}
    total = sum(sizes[name] for name in config.splits)
    seen: set[tuple] = set()
    out: dict[str, list[dict[str, str]]] = {name: [] for name in config.splits}
    # Held-out splits are drawn first so that a small problem space never starves the test set.
    for name in reversed(config.splits):
        attempts = 0
        while len(out[name]) < sizes[name]:
            attempts += 1
            if attempts > 50 * total + 1000:
                raise ValueError(
                    f"cannot draw {total} distinct problems from this configuration (got {len(seen)}); "
                    "allow more steps, operators or a larger operand range"
                )
            problem = draw_problem(rng, config, config.train_min_steps if name == "train" else None)
            key = (problem.start, problem.ops)
            if key in seen:
                continue
            seen.add(key)
            out[name].append(make_record(problem, config, rng))
    return out


def check_cot(cot: str) -> int:
    """Evaluate a GSM8k-Aug CoT step by step; returns the last result. Raises ValueError when a step
    is malformed, does not evaluate to its stated result, or does not start from the previous result."""
    previous: int | None = None
    for step in cot.split(" "):
        match = _STEP.match(step)
        if not match:
            raise ValueError(f"malformed step {step!r}")
        expression, stated = match.group(1), int(match.group(2))
        if not re.fullmatch(r"[\d+\-*/%() ]+", expression):
            raise ValueError(f"unexpected characters in {expression!r}")
        value = eval(expression, {"__builtins__": {}}, {})  # digits and operators only (checked above)
        if value != stated:
            raise ValueError(f"{step!r} evaluates to {value}, not {stated}")
        first = int(re.match(r"\(?(-?\d+)", expression).group(1))
        if previous is not None and first != previous:
            raise ValueError(f"{step!r} does not start from the previous result {previous}")
        previous = stated
    if previous is None:
        raise ValueError("empty CoT")
    return previous


def to_icot_line(record: dict[str, str]) -> str:
    return f"{record['question']}||{record['cot']} {record['answer']}"


def write_splits(
    splits: dict[str, list[dict[str, str]]], out_dir: str, config: SynthConfig
) -> dict[str, str]:
    """Write `<split>.txt` (ICoT format) and `<split>.jsonl`, plus `synth_config.json`; returns txt paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, records in splits.items():
        paths[name] = os.path.join(out_dir, f"{name}.txt")
        with open(paths[name], "w", encoding="utf-8") as handle:
            handle.writelines(to_icot_line(record) + "\n" for record in records)
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in records)
    with open(os.path.join(out_dir, "synth_config.json"), "w") as handle:
        json.dump({**asdict(config), "sizes": {k: len(v) for k, v in splits.items()}}, handle, indent=2)
    return paths


def synthesize(out_dir: str, config: SynthConfig) -> dict[str, str]:
    """Generate and write all splits; returns the `.txt` path of each split."""
    return write_splits(make_splits(config), out_dir, config)

"""The one scoring rule: how a generated text becomes a prediction and when a prediction is correct.

Every caller (`codi eval`, `codi probe`, the demo's table, the benchmarks) scores with these functions,
so the same outputs always get the same verdicts. Two extractions per answer:

  reference: the reference's extraction (commas removed, LAST match of `-?\\d+\\.?\\d*`, float);
  strict:    only the number right after the last answer prompt (no prompt -> wrong).

For k sampled answers per question (`codi.inference.generate.generate_samples`): pass@k (some sample correct),
the unbiased pass@1 (mean sample accuracy) and majority-vote accuracy.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence

logger = logging.getLogger(__name__)

_NUMBER = re.compile(r"-?\d+\.?\d*")
_WHOLE_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)$")
ABS_TOLERANCE = 1e-4
REL_TOLERANCE = 1e-9
ANSWER_PROMPT = "The answer is:"  # precedes the answer value in every training target

Prediction = float | str | None


# --------------------------------------------------------------------------------------------------
# Gold answers and predictions


def as_number(text: str) -> float | None:
    """`text` as a number when the whole of it is a plain decimal (commas and surrounding whitespace
    ignored; no exponent, `_`, inf or nan) that a float holds finitely, else None. Digits beyond a
    float's range (10^400) would become infinity, equal to every other such number: None."""
    text = text.strip().replace(",", "")
    if not _WHOLE_NUMBER.match(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def parse_gold(value, where: str = "") -> float | None:
    """Numeric gold: a finite number, or text whose part after the last `####` is a plain decimal
    (`as_number`). Anything else (words, `inf`, `nan`, `1_000`, 10^400) is logged and counted wrong."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # a JSON integer beyond a float's range
            number = math.inf
        if math.isfinite(number):
            return number
    elif not isinstance(value, bool):
        text = str(value).rpartition("####")[2] if "####" in str(value) else str(value)
        number = as_number(text)
        if number is not None:
            return number
    # the reference uses float("inf") here: never correct. None is logged and counted wrong.
    logger.warning(
        "%s: gold answer %r is not a finite decimal number; the item counts as wrong", where, value
    )
    return None


def extract_answer(text: str) -> float | None:
    """Reference extraction: remove commas, take the LAST match of `-?\\d+\\.?\\d*` as a float.

    "$1,200." -> 1200.0; "x = -3.5" -> -3.5; no number -> None (scored wrong, as the reference's inf).
    """
    matches = _NUMBER.findall(text.replace(",", ""))
    return float(matches[-1]) if matches else None


def extract_answer_strict(text: str, answer_prompt: str = ANSWER_PROMPT) -> float | None:
    """The number right after the LAST `answer_prompt` (spaces and a `$` allowed between); else None."""
    head, found, tail = text.rpartition(answer_prompt)
    if not found:
        return None
    match = re.match(r"\s*\$?\s*(-?\d+\.?\d*)", tail.replace(",", ""))
    return float(match.group(1)) if match else None


def extract_choice(text: str) -> str | None:
    """Reference extraction for CommonsenseQA: a number means wrong (None); otherwise the first
    character after the last `The answer is:`, and the reference's guess "C" when it is not A-E."""
    if _NUMBER.search(text.replace(",", "")):
        return None
    tail = text.split(ANSWER_PROMPT)[-1].strip()
    return tail[0] if tail and tail[0] in "ABCDE" else "C"


def extract_choice_strict(text: str, answer_prompt: str = ANSWER_PROMPT) -> str | None:
    """The letter A-E right after the last `answer_prompt`, else None."""
    head, found, tail = text.rpartition(answer_prompt)
    tail = tail.strip()
    return tail[0] if found and tail and tail[0] in "ABCDE" else None


def extractors(
    answer_kind: str = "number", answer_prompt: str = ANSWER_PROMPT
) -> tuple[Callable[[str], Prediction], Callable[[str], Prediction]]:
    """(reference, strict) extraction functions for an answer kind ("number" or "choice")."""
    if answer_kind == "choice":
        return extract_choice, lambda text: extract_choice_strict(text, answer_prompt)
    if answer_kind == "number":
        return extract_answer, lambda text: extract_answer_strict(text, answer_prompt)
    raise ValueError(f"answer_kind must be 'number' or 'choice', got {answer_kind!r}")


def is_correct(prediction: Prediction, gold: Prediction) -> bool:
    """THE correctness rule. Float compare: |p - g| <= 1e-4 absolute, or 1e-9 relative for huge values.

    Why not the reference's exact `==`: both sides come from decimal text, so they only differ by
    float noise (e.g. gold 0.30000000000000004 from a computed target). Why not 1e-4 RELATIVE:
    GSM-Hard golds reach 1e7, where that would accept an off-by-one answer. Letters compare exactly;
    a missing prediction or gold is wrong, and so is an infinite or NaN one.
    """
    if prediction is None or gold is None:
        return False
    if isinstance(prediction, str) or isinstance(gold, str):
        return prediction == gold
    if not (math.isfinite(prediction) and math.isfinite(gold)):
        return False  # 10^400 and 2x10^400 both read as infinity: equal floats, different numbers
    return math.isclose(prediction, gold, rel_tol=REL_TOLERANCE, abs_tol=ABS_TOLERANCE)


def score_text(
    text: str, gold: Prediction, answer_kind: str = "number", answer_prompt: str = ANSWER_PROMPT
) -> dict:
    """Both predictions and both verdicts of one generated text (the fields of an evaluation record)."""
    reference_of, strict_of = extractors(answer_kind, answer_prompt)
    prediction, strict = reference_of(text), strict_of(text)
    return {
        "prediction": prediction,
        "correct": is_correct(prediction, gold),
        "strict_prediction": strict,
        "strict_correct": is_correct(strict, gold),
    }


# --------------------------------------------------------------------------------------------------
# k samples per question


def majority_vote(predictions: Sequence[Prediction]) -> Prediction:
    """The most frequent prediction (None votes for nothing); equal values by `is_correct` count as one;
    a tie goes to the value seen first. All None -> None."""
    groups: list[list] = []  # [representative, count]
    for prediction in predictions:
        if prediction is None:
            continue
        for group in groups:
            if is_correct(prediction, group[0]):
                group[1] += 1
                break
        else:
            groups.append([prediction, 1])
    if not groups:
        return None
    return max(groups, key=lambda group: group[1])[0]  # max keeps the first of equal counts


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k of one question from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    if not 1 <= k <= num_samples:
        raise ValueError(f"k must be in [1, {num_samples}], got {k}")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - math.comb(num_samples - num_correct, k) / math.comb(num_samples, k)


def sample_metrics(verdicts: Sequence[Sequence[bool]], majority_verdicts: Sequence[bool]) -> dict:
    """Accuracies (%) over questions from each question's k sample verdicts and its majority verdict.

    pass_at_k: some sample correct; pass_at_1: mean sample accuracy (the unbiased pass@1);
    majority_accuracy: the majority-vote answer correct. pass_at_k >= majority_accuracy always.
    """
    n = len(verdicts)
    if n == 0:
        return {"pass_at_k": 0.0, "pass_at_1": 0.0, "majority_accuracy": 0.0}
    return {
        "pass_at_k": 100.0 * sum(any(row) for row in verdicts) / n,
        "pass_at_1": 100.0 * sum(pass_at_k(len(row), sum(row), 1) for row in verdicts) / n,
        "majority_accuracy": 100.0 * sum(majority_verdicts) / n,
    }

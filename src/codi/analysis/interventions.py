"""Interventions on the latent thoughts at inference: do the answers depend on them? (`codi ablate`)

Each intervention changes the latents a CODI model feeds itself between `<bot>` and `<eot>`
(docs/method.md#inference) and nothing else; the answer is then decoded greedily and scored as
`codi eval` scores it. L below is the number of latents the model runs by default
(its `num_latent`, the trained count unless `codi eval --num_latent` says otherwise).

- `none`: the unmodified model (the reference every other row is compared with).
- `zero`: every latent is replaced by a zero vector (the LM receives zeros as input embeddings; a
  learned-position model still adds its position embedding inside the LM).
- `noise` (sigma): each latent, as it is made, becomes latent + sigma * RMS(latent) * eps, where RMS is
  taken over the hidden dimension of that latent and eps ~ N(0, I) is drawn once per (question, step)
  from `seed` (the same eps for every sigma, so the sweep is smooth). Later latents are computed from the
  noisy ones: the noise propagates, as it would inside the model.
- `shuffle`: question i is fed, in place of its own, the recorded unmodified latents of question
  s(i), where s is a random cyclic permutation of the WHOLE evaluated set (Sattolo's algorithm, seeded:
  no question keeps its own latents when there are >= 2). Independent of batching.
- `reverse`: each question's recorded latents are fed in reverse order (step t gets latent L-1-t).
- `permute`: each question's recorded latents are fed in a random order without fixed points (one
  cyclic permutation of the L steps per question, seeded); a no-op when L = 1, so skipped then.
- `first_k` (k = 0..L): only the first k latents are fed (`<bot>`, k latents, `<eot>`); k = 0 feeds no
  latent at all. Equal, by construction, to running k latent iterations (one run serves both).
- `num_latent` (n = 0..2L, or L+1..2L when `first_k` runs too): n latent iterations, more or fewer than
  trained (the paper's accuracy-against-latent-count figure).

Batching: `length_batches` groups the questions as `generate` does and each group is one `generate`
call, so a transform knows which question each row is; replays and noise are indexed by question, so
results do not depend on the batch size (up to the float noise of padding, as in `codi eval`).

"Recorded" latents are those the unmodified run fed (`generate(..., return_latents=True)`); feeding them
back in their own order reproduces the unmodified answers exactly (tested).

The verdict (answers depend on the latents or not) and its rule: `codi.analysis.ablate` (module docstring).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..data.dataset import encode_question
from ..inference.generate import GenerationOutput, generate, length_order_batches
from ..inference.scoring import extractors, is_correct
from ..report import ablation_chart, ablation_table, binomial_half_width, paired_drop
from .ablate import verdict, write_outputs

logger = logging.getLogger(__name__)

FAMILIES = ("none", "zero", "noise", "shuffle", "reverse", "permute", "first_k", "num_latent")
DEFAULT_FAMILIES = FAMILIES[1:]
DEFAULT_SIGMAS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
REPLAYS = ("shuffle", "reverse", "permute")


@dataclass(frozen=True)
class Intervention:
    """One change to the latents. value: sigma (noise), k (first_k), the count (num_latent), else None."""

    family: str
    value: float | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown intervention {self.family!r}; known: {', '.join(FAMILIES)}")
        needs_value = self.family in ("noise", "first_k", "num_latent")
        if needs_value != (self.value is not None):
            raise ValueError(
                f"intervention {self.family!r}: value {'required' if needs_value else 'not used'}"
            )
        if needs_value and self.value < 0:
            raise ValueError(f"intervention {self.family!r}: value must be >= 0, got {self.value}")

    @property
    def name(self) -> str:
        if self.family == "noise":
            return f"noise sigma={self.value:g}"
        if self.family in ("first_k", "num_latent"):
            return f"{self.family}={int(self.value)}"
        return self.family

    def num_latent(self, default: int) -> int:
        """Latents fed under this intervention when the model runs `default` of them."""
        return int(self.value) if self.family in ("first_k", "num_latent") else default

    def run_key(self, default: int) -> tuple:
        """Interventions with one key give the same answers (first_k=k, num_latent=k, none at k=L)."""
        if self.family in ("none", "first_k", "num_latent"):
            return ("count", self.num_latent(default))
        return (self.family, self.value)


def build_interventions(
    families: Sequence[str] = DEFAULT_FAMILIES,
    num_latent: int = 6,
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
    max_num_latent: int | None = None,
) -> list[Intervention]:
    """The list of interventions to run, `none` first. max_num_latent: top of the num_latent sweep (2L);
    with `first_k` also requested, the sweep starts at L + 1 (first_k=k already runs k latents)."""
    top = 2 * num_latent if max_num_latent is None else max_num_latent
    result = [Intervention("none")]
    for family in families:
        if family == "none":
            continue
        if family == "noise":
            result += [Intervention("noise", float(sigma)) for sigma in sigmas]
        elif family == "first_k":
            result += [Intervention("first_k", k) for k in range(num_latent + 1)]
        elif family == "num_latent":  # n <= L would repeat first_k's runs (the same answers)
            start = num_latent + 1 if "first_k" in families else 0
            result += [Intervention("num_latent", n) for n in range(start, top + 1)]
        elif family == "permute" and num_latent < 2:
            logger.warning("permute skipped: it needs at least 2 latents (the model runs %d)", num_latent)
        else:
            result.append(Intervention(family))
    return result


def parse_families(text: str) -> list[str]:
    """`"zero,noise,shuffle"` -> the families, each checked ("all" = every one)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(DEFAULT_FAMILIES)
    for name in names:
        if name not in FAMILIES:
            raise ValueError(
                f"--interventions: unknown intervention {name!r}; known: {', '.join(FAMILIES)}, all"
            )
    if not names:
        raise ValueError("--interventions is empty")
    return names


# --------------------------------------------------------------------------------------------------
# Transforms: factories that, given the original indices of a batch's rows, return the
# `latent_transform(step, latent (B, d)) -> (B, d)` that generation applies to that batch.

TransformFactory = Callable[[list[int]], Callable[[int, torch.Tensor], torch.Tensor]]


def cyclic_permutation(n: int, seed: int) -> list[int]:
    """A random permutation of range(n) made of one cycle (Sattolo): no fixed point when n >= 2."""
    order = list(range(n))
    rng = random.Random(seed)
    for index in range(n - 1, 0, -1):
        other = rng.randrange(index)
        order[index], order[other] = order[other], order[index]
    return order


def zero_factory() -> TransformFactory:
    return lambda rows: lambda step, latent: torch.zeros_like(latent)


def noise_factory(eps: torch.Tensor, sigma: float) -> TransformFactory:
    """eps: (N, steps, d) standard normal draws; question i's latent at `step` gets sigma * RMS * eps[i, step]."""

    def factory(rows: list[int]):
        draws = eps[rows]

        def transform(step: int, latent: torch.Tensor) -> torch.Tensor:
            value = latent.float()
            rms = value.pow(2).mean(-1, keepdim=True).sqrt()
            noise = draws[:, step].to(device=latent.device, dtype=torch.float32)
            return (value + sigma * rms * noise).to(latent.dtype)

        return transform

    return factory


def replay_factory(recorded: torch.Tensor, sources: Sequence[int], orders: torch.Tensor) -> TransformFactory:
    """Feed recorded latents: question i gets, at step t, recorded[sources[i], orders[i, t]].

    recorded: (N, L, d) the unmodified run's latents; orders: (N, L) long.
    """
    sources = torch.as_tensor(list(sources), dtype=torch.long)

    def factory(rows: list[int]):
        index = torch.as_tensor(rows, dtype=torch.long)
        chosen = recorded[sources[index].unsqueeze(1), orders[index]]  # (B, L, d)

        def transform(step: int, latent: torch.Tensor) -> torch.Tensor:
            return chosen[:, step].to(device=latent.device, dtype=latent.dtype)

        return transform

    return factory


def replay_plan(family: str, n: int, steps: int, seed: int) -> tuple[list[int], torch.Tensor]:
    """(sources (N,), orders (N, L)) of a replay intervention; see the module docstring."""
    identity = torch.arange(steps).expand(n, steps)
    if family == "shuffle":
        return cyclic_permutation(n, seed), identity.clone()
    if family == "reverse":
        return list(range(n)), identity.flip(-1).clone()
    if family == "permute":
        orders = [cyclic_permutation(steps, seed * 1_000_003 + i) for i in range(n)]
        return list(range(n)), torch.tensor(orders, dtype=torch.long).reshape(n, steps)
    if family == "none":
        return list(range(n)), identity.clone()
    raise ValueError(f"{family!r} is not a replay intervention")


# --------------------------------------------------------------------------------------------------
# Running and scoring


def length_batches(model, questions: Sequence[str], batch_size: int) -> list[list[int]]:
    """Original indices grouped as `generate` groups them: by decreasing prompt length, ties in input
    order, cut every `batch_size`. Each batch is then passed to `generate` on its own, in this order,
    so that row r of a latent transform's (B, d) is question batch[r] and the answers are those of one
    `generate` call over all the questions (the same batch compositions)."""
    lengths = [len(encode_question(model.tokenizer, question)) for question in questions]
    return length_order_batches(lengths, batch_size)


def run_latent(
    model,
    questions: Sequence[str],
    batches: list[list[int]],
    num_latent: int,
    factory: TransformFactory | None = None,
    return_latents: bool = False,
    **options,
) -> list[GenerationOutput]:
    """Latent-mode answers for every question (input order), `factory(rows)` applied per batch."""
    outputs: list[GenerationOutput | None] = [None] * len(questions)
    for rows in batches:
        answers = generate(
            model,
            [questions[index] for index in rows],
            mode="latent",
            num_latent=num_latent,
            batch_size=len(rows),
            return_latents=return_latents,
            latent_transform=None if factory is None else factory(rows),
            **options,
        )
        for index, answer in zip(rows, answers):
            outputs[index] = answer
    return outputs  # type: ignore[return-value]


def score_outputs(outputs, items, answer_kind: str = "number") -> list[tuple[object, bool]]:
    """(prediction, correct) per item, with `codi eval`'s reference extraction and comparison."""
    extract = extractors(answer_kind)[0]  # a bad answer_kind is an error, not a silent "number"
    scored = []
    for output, item in zip(outputs, items):
        prediction = extract(output.text)
        scored.append((prediction, is_correct(prediction, item.gold)))
    return scored


def _factory_for(intervention: Intervention, recorded, eps, seed: int) -> TransformFactory | None:
    family = intervention.family
    if family == "zero":
        return zero_factory()
    if family == "noise":
        return noise_factory(eps, float(intervention.value))
    if family in REPLAYS:
        n, steps = recorded.shape[:2]
        sources, orders = replay_plan(family, n, steps, seed)
        return replay_factory(recorded, sources, orders)
    return None  # none / first_k / num_latent: only the number of latents changes


def _skip_reason(intervention: Intervention, n: int, steps: int) -> str | None:
    if intervention.family in ("zero", "noise", *REPLAYS) and steps == 0:
        return "the model runs no latent"
    if intervention.family == "shuffle" and n < 2:
        return "shuffling needs at least 2 questions"
    if intervention.family in ("reverse", "permute") and steps < 2:
        return "reordering needs at least 2 latents"
    return None


def _sample_lines(intervention, items, outputs, scored, recorded_plan) -> list[dict]:
    lines = []
    for index, (item, output, (prediction, correct)) in enumerate(zip(items, outputs, scored)):
        line = {
            "intervention": intervention.name,
            "family": intervention.family,
            "value": intervention.value,
            "index": index,
            "where": item.where,
            "question": item.question,
            "gold": item.gold,
            "prediction": prediction,
            "correct": correct,
            "generated_text": output.text,
            "num_generated_tokens": output.num_generated_tokens,
            "num_latent_positions": output.num_latent_positions,
        }
        if recorded_plan is not None:  # which recorded latents were fed, in which order
            sources, orders = recorded_plan
            line["latent_source"] = sources[index]
            line["latent_order"] = orders[index].tolist()
        lines.append(line)
    return lines


def _summary_row(intervention: Intervention, steps: int, outputs, scored, reference) -> dict:
    """Accuracy, its 95 % half-width, the paired drop from `reference` and the share of changed answers."""
    n = len(scored)
    correct = [ok for _, ok in scored]
    accuracy = sum(correct) / n
    drop, lo, hi = paired_drop([ok for _, ok in reference], correct)
    return {
        "name": intervention.name,
        "family": intervention.family,
        "value": intervention.value,
        "num_latent": intervention.num_latent(steps),
        "accuracy": accuracy,
        "half_width": binomial_half_width(accuracy, n),
        "drop": drop,
        "drop_lo": lo,
        "drop_hi": hi,
        "changed": sum(p != q for (p, _), (q, _) in zip(scored, reference)) / n,
        "mean_generated_tokens": sum(o.num_generated_tokens for o in outputs) / n,
    }


def _drops(rows: list[dict]) -> dict[str, tuple[float, float, float]]:
    """(drop, low, high) per intervention family, and for feeding no latent at all (`no_latent`)."""
    drops = {row["family"]: (row["drop"], row["drop_lo"], row["drop_hi"]) for row in rows}
    for row in rows:
        if row["family"] in ("first_k", "num_latent") and row["num_latent"] == 0:
            drops["no_latent"] = (row["drop"], row["drop_lo"], row["drop_hi"])
    return drops


def ablate(
    model,
    items,
    interventions: Sequence[Intervention] | None = None,
    *,
    batch_size: int = 32,
    max_new_tokens: int = 256,
    answer_kind: str = "number",
    seed: int = 0,
    margin: float = 0.05,
    no_cot_accuracy: float | None = None,
    output_dir: str | None = None,
    title: str | None = None,
    progress: bool = False,
) -> dict:
    """Answer `items` (EvalItems) under each intervention; accuracy, paired drops, verdict, files.

    interventions: default `build_interventions(num_latent=L)`; `none` is always run first (the
    recorded latents come from it). no_cot_accuracy (fraction): drawn as a reference line when given.
    output_dir: writes `samples.jsonl` (one line per intervention and question), `results.json`,
    `table.txt` and `interventions.png`. Returns the summary (accuracies as fractions).
    """
    if not items:
        raise ValueError("ablate: no items to evaluate")
    steps = model.args.latents()
    interventions = list(interventions or build_interventions(num_latent=steps))
    interventions = [Intervention("none")] + [iv for iv in interventions if iv.family != "none"]
    questions = [item.question for item in items]
    batches = length_batches(model, questions, batch_size)
    options = dict(max_new_tokens=max_new_tokens)
    base = run_latent(model, questions, batches, steps, return_latents=True, **options)
    width = model.hf_model.get_input_embeddings().weight.shape[1]
    recorded = torch.stack([o.latents for o in base]) if steps else torch.zeros(len(items), 0, width)
    eps = torch.randn(len(items), steps, width, generator=torch.Generator().manual_seed(seed))
    runs = {Intervention("none").run_key(steps): base}
    rows, samples, reference = [], [], []
    if progress:
        from tqdm.auto import tqdm

        interventions = tqdm(interventions, desc="codi ablate", unit="intervention")
    for intervention in interventions:
        reason = _skip_reason(intervention, len(items), steps)
        if reason:
            logger.warning("%s skipped: %s", intervention.name, reason)
            continue
        key = intervention.run_key(steps)
        if key not in runs:
            factory = _factory_for(intervention, recorded, eps, seed)
            runs[key] = run_latent(
                model, questions, batches, intervention.num_latent(steps), factory, **options
            )
        scored = score_outputs(runs[key], items, answer_kind)
        if not rows:  # `none` comes first: the reference of every paired comparison
            reference = scored
        rows.append(_summary_row(intervention, steps, runs[key], scored, reference))
        plan = (
            replay_plan(intervention.family, *recorded.shape[:2], seed)
            if intervention.family in REPLAYS
            else None
        )
        samples.extend(_sample_lines(intervention, items, runs[key], scored, plan))
    result = {
        "title": title,
        "n": len(items),
        "num_latent": steps,
        "seed": seed,
        "margin": margin,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "no_cot_accuracy": no_cot_accuracy,
        "rows": rows,
        "verdict": verdict(_drops(rows), margin, rows[0]["accuracy"]),
    }
    result["table"] = ablation_table(result)
    if output_dir:
        result["files"] = write_outputs(result, samples, output_dir)
        ablation_chart(result, result["files"]["png"])
    return result

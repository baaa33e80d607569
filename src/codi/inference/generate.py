"""Batched, KV-cached generation in both of a CODI model's modes (docs/method.md#evaluation).

latent (student):  Q ++ [bot] -> num_latent latent thoughts -> [eot] -> answer tokens until EOS
cot (teacher):     Q -> explicit chain of thought ++ "The answer is: N" -> EOS

Questions are sorted by length and cut into batches (less padding), left-padded, and the results are
returned in input order. Padding is masked at every step (question, latents, decoder) and position
ids skip the pads, so the greedy output of an example does not depend on which batch it is in. With
the reference policy (`codi.reference`) the latent path instead reproduces the reference's unmasked steps.
Options: one `DecodingConfig` (`.decoding`); k answers per question (pass@k, majority vote): `generate_samples`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..data.dataset import encode_answer, encode_question, pad_sequences
from ..io.hf import max_positions
from . import static_decode
from .decoding import (
    DecodingConfig,
    apply_processors,
    dropout_on,
    latent_noise,
    make_config,
    noisy_latents,
    row_seed,
    sample_next,
    token_buffers,
    token_processors,
)

logger = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    """One answer.

    text: the generated tokens decoded without special tokens.
    token_ids: the generated token ids, the EOS included when one was generated.
    num_generated_tokens: len(token_ids) (each one cost a decoder forward position).
    num_latent_positions: latent thoughts fed before `<eot>` (0 in CoT mode; `<bot>`, `<eot>` not counted).
    latents: (num_latent, d) float32 CPU tensor of the latent embeddings fed, when asked for.
    """

    text: str
    token_ids: list[int]
    num_generated_tokens: int
    num_latent_positions: int
    latents: torch.Tensor | None = None


def length_order_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first, so memory errors come early)."""
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def suppressed_token_ids(model) -> list[int]:
    """Ids that the decoder never emits.

    Default: `<bot>`, `<eot>` and an added `<pad>` (never training targets). Under the reference
    policy only the last embedding row, as the reference slices `logits[:, :vocab_size - 1]`.
    """
    if model.policy.suppress_last_row_only:
        return [model.hf_model.get_input_embeddings().weight.shape[0] - 1]
    ids = {model.bot_id, model.eot_id}
    if model.pad_id is not None and model.pad_id != model.tokenizer.eos_token_id:
        ids.add(model.pad_id)
    return sorted(ids)


class _CoTState:
    """KV cache, padding mask (B, past) and next position ids (B,) of a teacher-mode decode."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model = model
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = model.lm_step(
            model.embed(input_ids),
            attention_mask,
            positions,
            None,
            hidden_states=False,
            last_logits_only=True,
        )
        self.cache, self.mask = out.cache, attention_mask
        self.next_position = attention_mask.long().sum(-1)
        self.first_logits = out.logits[:, -1]

    def step(self, input_ids: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B, 1); rows with mask 0 are padding. Returns logits (B, V)."""
        self.mask = torch.cat([self.mask, input_mask], dim=1)
        out = self.model.lm_step(
            self.model.embed(input_ids),
            self.mask,
            self.next_position.unsqueeze(1),
            self.cache,
            hidden_states=False,
            last_logits_only=True,
        )
        self.cache = out.cache
        self.next_position = self.next_position + input_mask[:, 0].long()
        return out.logits[:, -1]


@dataclass
class _LatentPlan:
    """The latent sampling of one batch: the transform applied to each latent, the dropout seed."""

    latent_transform: object = None
    dropout_seed: int | None = None


def _start_latent(model, input_ids, attention_mask, config: DecodingConfig, num_latent, max_new_tokens, plan):
    """Encode Q ++ [bot] and the latents, feed `<eot>` (+ the answer prompt); returns (step, first logits,
    forced prompt ids, latents)."""
    device = model.device
    dropout = dropout_on(model, plan.dropout_seed, device) if config.latent_dropout else None
    with dropout or contextlib.nullcontext():
        prefix = model.encode_latents(
            input_ids, attention_mask, num_latent, latent_transform=plan.latent_transform
        )

    def step(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = model.decode_step(prefix, ids, mask, hidden_states=False, last_logits_only=True)
        return out.logits[:, -1]

    forced = answer_prompt_ids(model) if config.feed_answer_prompt else []
    forced = forced[: max_new_tokens - 1]  # at least one free token after the prompt
    batch = input_ids.shape[0]
    first = torch.tensor([[model.eot_id] + forced], device=device).expand(batch, -1)
    logits = step(first, attention_mask.new_ones(batch, first.shape[1]))
    return step, logits, forced, prefix.latents


def _decode_batch(
    model,
    prompts: list[list[int]],
    config: DecodingConfig,
    num_latent: int,
    sampling: dict,
    return_latents: bool,
    plan: _LatentPlan,
    kind: str | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Generated ids (B, steps) padded after EOS, and the latents [(B, d)] when asked for. `kind`: the
    call's `static_decode.engine` (worked out here when not given).

    min_new_tokens: EOS is suppressed before that many tokens (as in `transformers.generate`); with
        min_new_tokens == max_new_tokens the loop has no host sync at all (benchmarks: fixed lengths).
    feed_answer_prompt (latent mode): `<eot>` and the answer prompt's tokens in ONE forward; the prompt
        tokens are returned as the first generated ones (the text is the same when the model would have
        generated the prompt itself, which training teaches it to do).
    """
    device = model.device
    max_new_tokens = _fit_position_limit(
        model, max(len(p) for p in prompts), config.mode, num_latent, config.max_new_tokens
    )
    min_new_tokens = min(config.min_new_tokens, max_new_tokens)
    input_ids = pad_sequences(prompts, model.pad_id, "left").to(device)
    attention_mask = (pad_sequences([[1] * len(p) for p in prompts], 0, "left")).to(device)
    kind = kind or static_decode.engine(model, config)
    if kind != "eager":  # the same loop on a static cache (codi.inference.static_decode)
        forced = answer_prompt_ids(model)[: max_new_tokens - 1] if config.feed_answer_prompt else []
        run = dict(num_latent=num_latent, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
        run |= dict(forced=forced, suppress=suppressed_token_ids(model), sampling=sampling, plan=plan)
        run["sample"] = sample_next  # this module's, looked up now (tests replace it)
        result = static_decode.decode(model, input_ids, attention_mask, config, run, kind)
        if result is not None:  # None: the model's cache cannot be static
            return result[0], (result[1] if return_latents else None)
    batch = input_ids.shape[0]
    eos = model.tokenizer.eos_token_id
    latents = None  # CoT mode has none
    if config.mode == "latent":
        step, logits, forced, latents = _start_latent(
            model, input_ids, attention_mask, config, num_latent, max_new_tokens, plan
        )
    else:
        forced = []
        state = _CoTState(model, input_ids, attention_mask)
        step, logits = state.step, state.first_logits
    suppress = suppressed_token_ids(model)
    early, late = (
        token_processors(suppress, min_new_tokens, eos, device),
        token_processors(suppress, 0, eos, device),
    )
    generated, finished = token_buffers(model.pad_id, batch, max_new_tokens, forced, device)
    steps = len(forced)
    for position in range(len(forced), max_new_tokens):
        processors = early if position < min_new_tokens else late
        logits = apply_processors(processors, generated[:, :position], logits)
        next_ids = sample_next(logits, **sampling)
        next_ids = next_ids.masked_fill(finished, model.pad_id)
        generated[:, position] = next_ids
        steps = position + 1
        if eos is not None:
            finished = finished | (next_ids == eos)
        # The one host sync per token (none before min_new_tokens, when no row can have finished):
        # stop as soon as every row has produced EOS.
        if steps == max_new_tokens or (steps >= min_new_tokens and bool(finished.all())):
            break
        # Finished rows keep feeding pad with mask 0: nothing attends to it and positions stay put.
        logits = step(next_ids.unsqueeze(1), (~finished).long().unsqueeze(1))
    return generated[:, :steps], (latents if return_latents else None)


def _generate_batch(
    model,
    prompts: list[list[int]],
    mode: str,
    num_latent: int,
    max_new_tokens: int,
    sampling: dict,
    return_latents: bool,
    min_new_tokens: int = 0,
    feed_answer_prompt: bool = False,
    latent_transform=None,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """`_decode_batch` with the options of earlier versions as arguments (kept for callers of it)."""
    config = DecodingConfig(mode=mode, num_latent=num_latent, max_new_tokens=max_new_tokens)
    config = replace(config, min_new_tokens=min_new_tokens, feed_answer_prompt=feed_answer_prompt)
    plan = _LatentPlan(latent_transform=latent_transform)
    return _decode_batch(model, prompts, config, num_latent, sampling, return_latents, plan)


def _too_long(prompt_length: int, extra: int, limit: int) -> str:
    return (
        f"does not fit: a prompt of {prompt_length} tokens (+{extra} latent/<eot> positions) does not fit "
        f"the model's {limit} positions; shorten the question or use fewer latents"
    )


def _fit_position_limit(model, prompt_length: int, mode: str, num_latent: int, max_new_tokens: int) -> int:
    """Shorten `max_new_tokens` so that prompt + latents + `<eot>` + answer fit the position limit."""
    limit = max_positions(model.hf_model)
    if limit is None:
        return max_new_tokens
    used = prompt_length + (num_latent + 1 if mode == "latent" else 0)
    if used >= limit:  # `_encode` rejects such prompts first; kept for direct callers
        raise ValueError(_too_long(prompt_length, used - prompt_length, limit))
    if used + max_new_tokens > limit:
        logger.warning(
            "max_new_tokens=%d cut to %d: the model has %d positions", max_new_tokens, limit - used, limit
        )
        return limit - used
    return max_new_tokens


def answer_prompt_ids(model) -> list[int]:
    """The answer prompt's ids exactly as they start every training target (`"The answer is:"`, plus
    the lone space token of tokenizers that split it from the number)."""
    ids, value_index = encode_answer(model.tokenizer, "0", model.args.answer_prompt)
    return ids[:value_index]


def _num_latent(model, config: DecodingConfig) -> int:
    return model.args.latents(config.num_latent)


def _encode(model, questions: Sequence, config: DecodingConfig) -> tuple[list[list[int]], dict[int, str]]:
    """The prompt ids of each question, and why a question cannot be answered ({index: reason})."""
    if isinstance(questions, str):
        raise TypeError("questions must be a list of strings, not one string")
    latent = config.mode == "latent"
    limit = max_positions(model.hf_model)
    extra = _num_latent(model, config) + 1 if latent else 0
    prompts, problems = [], {}
    for index, question in enumerate(questions):
        if not isinstance(question, str):
            problems[index] = f"is {repr(question)[:40]}, not a string"
            prompts.append([])
            continue
        prompt = encode_question(model.tokenizer, question) + ([model.bot_id] if latent else [])
        if not prompt:
            problems[index] = "is empty: CoT mode needs at least one question token"
        elif limit is not None and len(prompt) + extra >= limit:
            problems[index] = _too_long(len(prompt), extra, limit)
        prompts.append(prompt)
    return prompts, problems


def unfit_questions(
    model, questions: Sequence, config: DecodingConfig | None = None, **options
) -> dict[int, str]:
    """{index: reason} of the questions `generate` would refuse (not a string, empty in CoT mode, too
    long for the model's positions), so that a caller can skip and count them instead."""
    return _encode(model, questions, make_config(config, **options))[1]


def generate(
    model, questions: list[str], config: DecodingConfig | None = None, **options
) -> list[GenerationOutput]:
    """Answer `questions` with a `CODIModel`, in input order: one `GenerationOutput` per question.

    `config` (a `DecodingConfig`), with any of its fields given as keywords on top (`mode="cot"`, ...):
    mode "latent": Q ++ [bot], `num_latent` latent thoughts (default `model.args.num_latent`),
    then [eot] and greedy decoding (or sampling) until EOS or `max_new_tokens`.
    mode "cot": teacher-mode explicit chain-of-thought decoding from the question.
    `seed` seeds private generators for sampling (token sampling then depends on the batch composition;
    latent noise does not). `min_new_tokens`: no EOS before that many tokens (benchmarks force fixed
    lengths with it). `feed_answer_prompt` (latent mode): feed `<eot>` + the answer prompt in one forward
    instead of decoding the prompt token by token (fewer sequential steps; the prompt is in the returned
    tokens). k > 1 samples per question: `generate_samples`.
    `latent_transform(step, latent (B, d)) -> (B, d)` (latent mode): applied to each latent before it is
    fed, per batch (see `CODIModel.encode_latents`); batches follow length order, not input order.
    `return_latents`, `progress`: as in `generate_samples`, which this is with one sample per question.
    """
    fields = DecodingConfig.field_names()
    config = make_config(config, **{key: value for key, value in options.items() if key in fields})
    if config.num_samples != 1:
        raise ValueError("generate returns one answer per question: use generate_samples for num_samples > 1")
    rest = {key: value for key, value in options.items() if key not in fields}
    return [samples[0] for samples in generate_samples(model, questions, config, **rest)]


def generate_samples(
    model,
    questions: list[str],
    config: DecodingConfig | None = None,
    *,
    return_latents: bool = False,
    progress: bool = False,
    latent_transform=None,
    question_ids: Sequence[int] | None = None,
    **options,
) -> list[list[GenerationOutput]]:
    """`config.num_samples` answers per question ([question][sample]), drawn in the same batches.

    Each question is repeated k times inside the batches. The samples differ by token sampling
    (`do_sample`, `temperature`, ...; CoT and latent mode) and, in latent mode, by Gaussian noise on
    each latent (`latent_noise` x the latent's RMS; the noise of sample j of question i depends only on
    (seed, i, j)) and/or dropout left on while the latents are made (`latent_dropout`; seeded per batch).
    i is the question's position in `questions`, or `question_ids[position]` when given (a shard of a
    larger set under a launcher, or a set with questions left out: the noise follows the question).
    Noise applies before `latent_transform`. Without any of these the k samples equal the greedy answer.
    """
    config = make_config(config, **options)
    flat = _generate_rows(model, questions, config, return_latents, progress, latent_transform, question_ids)
    k = config.num_samples
    return [flat[index * k : (index + 1) * k] for index in range(len(questions))]


def _generate_rows(
    model, questions, config: DecodingConfig, return_latents, progress, latent_transform, question_ids=None
):
    """Outputs of every (question, sample) row, question-major (row = question * k + sample)."""
    prompts, problems = _encode(model, questions, config)
    if problems:
        index, reason = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} more questions)" if len(problems) > 1 else ""
        raise ValueError(f"questions[{index}] {reason}{more}")
    if not questions:
        return []
    num_latent = _num_latent(model, config)
    rows = [(question, sample) for question in range(len(prompts)) for sample in range(config.num_samples)]
    row_prompts = [prompts[question] for question, _ in rows]
    sampling = dict(
        do_sample=config.do_sample,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        generator=None,
    )
    if config.do_sample and config.seed is not None:
        sampling["generator"] = torch.Generator(device=model.device).manual_seed(config.seed)
    noise_seed = config.seed
    if config.samples_latents and noise_seed is None:
        noise_seed = int(torch.randint(0, 2**62, ()))  # follows torch.manual_seed
    batches = length_order_batches([len(prompt) for prompt in row_prompts], config.batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"generate ({config.mode})", unit="batch")
    outputs: list[GenerationOutput | None] = [None] * len(rows)
    keys = list(question_ids) if question_ids is not None else range(len(prompts))  # seed each question
    if len(keys) != len(prompts):
        raise ValueError(f"question_ids: {len(keys)} ids for {len(prompts)} questions")
    was_training = model.training
    model.eval()  # dropout (LoRA, projection) off: greedy decoding must be deterministic
    try:
        kind = static_decode.engine(model, config)  # once per call (it may log why not fast)
        with torch.inference_mode(), static_decode.prepared(model, config, kind):
            for batch_number, indices in enumerate(batches):
                batch_rows = [(keys[rows[r][0]], rows[r][1]) for r in indices]
                plan = _plan(
                    model, config, num_latent, batch_rows, (noise_seed, batch_number), latent_transform
                )
                ids, latents = _decode_batch(
                    model,
                    [row_prompts[r] for r in indices],
                    config,
                    num_latent,
                    sampling,
                    return_latents,
                    plan,
                    kind,
                )
                rows_ids = ids.cpu().tolist()
                stacked = torch.stack(latents, dim=1).float().cpu() if latents else None
                for row_index, index in enumerate(indices):
                    outputs[index] = _make_output(
                        model.tokenizer,
                        rows_ids[row_index],
                        num_latent if config.mode == "latent" else 0,
                        stacked[row_index] if stacked is not None else None,
                    )
    finally:
        model.train(was_training)
    return outputs


def _plan(model, config: DecodingConfig, num_latent: int, rows, seeds, latent_transform) -> _LatentPlan:
    """The latent sampling of one batch of (question, sample) rows; seeds = (noise seed, batch number)."""
    plan = _LatentPlan(latent_transform=latent_transform)
    if config.mode != "latent":
        return plan
    noise_seed, batch_number = seeds
    if config.latent_noise > 0 and num_latent > 0:
        hidden = model.hf_model.get_input_embeddings().weight.shape[1]
        noise = latent_noise(rows, noise_seed, num_latent, hidden).to(model.device)
        plan.latent_transform = noisy_latents(noise, config.latent_noise, then=latent_transform)
    if config.latent_dropout:  # per batch, keyed by its first row too (shards under a launcher differ)
        plan.dropout_seed = row_seed(noise_seed, -1 - rows[0][0], batch_number)
    return plan


def _make_output(tokenizer, row: list[int], latent_positions: int, latents) -> GenerationOutput:
    """Cut a generated row after its first EOS and decode it."""
    eos = tokenizer.eos_token_id
    if eos is not None and eos in row:
        row = row[: row.index(eos) + 1]
    return GenerationOutput(
        text=tokenizer.decode(row, skip_special_tokens=True),
        token_ids=row,
        num_generated_tokens=len(row),
        num_latent_positions=latent_positions,
        latents=latents,
    )

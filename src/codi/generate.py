"""Batched, KV-cached generation in both of a CODI model's modes (SPEC §5).

latent (student):  Q ++ [bot] -> num_latent latent thoughts -> [eot] -> answer tokens until EOS
cot (teacher):     Q -> explicit chain of thought ++ "The answer is: N" -> EOS

Questions are sorted by length and cut into batches (less padding), left-padded, and the results are
returned in input order. Padding is masked at every step (question, latents, decoder) and position
ids skip the pads, so the greedy output of an example does not depend on which batch it is in. With
the reference policy (`codi.reference`) the latent path instead reproduces the reference's unmasked steps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .data import encode_answer, encode_question, pad_sequences

logger = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    """One answer.

    text: the generated tokens decoded without special tokens.
    token_ids: the generated token ids, the EOS included when one was generated.
    num_generated_tokens: len(token_ids) (each one cost a decoder forward position).
    num_latent_positions: latent thoughts fed before `<eot>` (0 in CoT mode); `<bot>` and `<eot>` are
        two further positions that are not counted here.
    latents: (num_latent, d) float32 CPU tensor of the latent embeddings fed, when asked for.
    """

    text: str
    token_ids: list[int]
    num_generated_tokens: int
    num_latent_positions: int
    latents: torch.Tensor | None = None


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
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


def sample_next(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): argmax, or temperature/top-k/top-p sampling."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token once the mass BEFORE it already reaches top_p (the most likely one always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.scatter(-1, sorted_index, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _CoTState:
    """KV cache, padding mask (B, past) and next position ids (B,) of a teacher-mode decode."""

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model = model
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = model.hf_model(
            inputs_embeds=model.embed(input_ids),
            attention_mask=attention_mask,
            position_ids=positions,
            cache=DynamicCache(),
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache, self.mask = out.cache, attention_mask
        self.next_position = attention_mask.long().sum(-1)
        self.first_logits = out.logits[:, -1]

    def step(self, input_ids: torch.Tensor, input_mask: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (B, 1); rows with mask 0 are padding. Returns logits (B, V)."""
        self.mask = torch.cat([self.mask, input_mask], dim=1)
        out = self.model.hf_model(
            inputs_embeds=self.model.embed(input_ids),
            attention_mask=self.mask,
            position_ids=self.next_position.unsqueeze(1),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self.cache = out.cache
        self.next_position = self.next_position + input_mask[:, 0].long()
        return out.logits[:, -1]


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
    """Generated ids (B, steps) padded after EOS, and the latents [(B, d)] when asked for.

    min_new_tokens: EOS is suppressed before that many tokens (as in `transformers.generate`); with
        min_new_tokens == max_new_tokens the loop has no host sync at all (benchmarks: fixed lengths).
    feed_answer_prompt (latent mode): `<eot>` and the answer prompt's tokens in ONE forward; the prompt
        tokens are returned as the first generated ones (the text is the same when the model would have
        generated the prompt itself, which training teaches it to do).
    """
    device = model.device
    max_new_tokens = _fit_position_limit(
        model, max(len(p) for p in prompts), mode, num_latent, max_new_tokens
    )
    min_new_tokens = min(min_new_tokens, max_new_tokens)
    input_ids = pad_sequences(prompts, model.pad_id, "left").to(device)
    attention_mask = (pad_sequences([[1] * len(p) for p in prompts], 0, "left")).to(device)
    batch = input_ids.shape[0]
    eos = model.tokenizer.eos_token_id
    suppress = torch.tensor(suppressed_token_ids(model), device=device)
    latents = None
    if mode == "latent":
        prefix = model.encode_latents(
            input_ids, attention_mask, num_latent, latent_transform=latent_transform
        )
        latents = prefix.latents if return_latents else None

        def step(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            out = model.decode_step(prefix, ids, mask, hidden_states=False, last_logits_only=True)
            return out.logits[:, -1]

        forced = answer_prompt_ids(model) if feed_answer_prompt else []
        forced = forced[: max_new_tokens - 1]  # at least one free token after the prompt
        first = torch.tensor([[model.eot_id] + forced], device=device).expand(batch, -1)
        logits = step(first, attention_mask.new_ones(batch, first.shape[1]))
    else:
        forced = []
        state = _CoTState(model, input_ids, attention_mask)
        step = state.step
        logits = state.first_logits
    generated = torch.full((batch, max_new_tokens), model.pad_id, dtype=torch.long, device=device)
    if forced:
        generated[:, : len(forced)] = torch.tensor(forced, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    suppress_eos = suppress if eos is None else torch.cat([suppress, suppress.new_tensor([eos])])
    steps = len(forced)
    for position in range(len(forced), max_new_tokens):
        logits = logits.index_fill(-1, suppress_eos if position < min_new_tokens else suppress, float("-inf"))
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
    return generated[:, :steps], latents


def max_positions(model) -> int | None:
    """The model's position limit (learned position tables crash past it), if its config states one."""
    config = model.hf_model.config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _fit_position_limit(model, prompt_length: int, mode: str, num_latent: int, max_new_tokens: int) -> int:
    """Shorten `max_new_tokens` so that prompt + latents + `<eot>` + answer fit the position limit."""
    limit = max_positions(model)
    if limit is None:
        return max_new_tokens
    used = prompt_length + (num_latent + 1 if mode == "latent" else 0)
    if used >= limit:
        raise ValueError(
            f"a prompt of {prompt_length} tokens (+{used - prompt_length} latent/<eot> positions) does not fit "
            f"the model's {limit} positions; shorten the question or use fewer latents"
        )
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


def generate(
    model,
    questions: list[str],
    *,
    mode: str = "latent",
    num_latent: int | None = None,
    max_new_tokens: int = 256,
    min_new_tokens: int = 0,
    feed_answer_prompt: bool = False,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    return_latents: bool = False,
    progress: bool = False,
    latent_transform=None,
) -> list[GenerationOutput]:
    """Answer `questions` with a `CODIModel`, in input order.

    mode "latent": Q ++ [bot], `num_latent` latent thoughts (default `model.args.inf_latent_iterations`),
    then [eot] and greedy decoding (or sampling) until EOS or `max_new_tokens`.
    mode "cot": teacher-mode explicit chain-of-thought decoding from the question.
    `seed` seeds a private generator for sampling (results then depend on the batch composition).
    `min_new_tokens`: no EOS before that many tokens (benchmarks force fixed lengths with it).
    `feed_answer_prompt` (latent mode): feed `<eot>` + the answer prompt in one forward instead of
    decoding the prompt token by token (fewer sequential steps; the prompt is in the returned tokens).
    `latent_transform(step, latent (B, d)) -> (B, d)` (latent mode): applied to each latent before it is
    fed, per batch (see `CODIModel.encode_latents`); batches follow length order, not input order.
    """
    if mode not in ("latent", "cot"):
        raise ValueError(f"mode must be 'latent' or 'cot', got {mode!r}")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size}, {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {min_new_tokens}")
    if feed_answer_prompt and mode != "latent":
        raise ValueError("feed_answer_prompt applies to mode='latent' only")
    if isinstance(questions, str):
        raise TypeError("questions must be a list of strings, not one string")
    num_latent = model.args.inf_latent_iterations if num_latent is None else num_latent
    if num_latent < 0:
        raise ValueError(f"num_latent must be >= 0, got {num_latent}")
    if not questions:
        return []
    tokenizer = model.tokenizer
    prompts = [encode_question(tokenizer, question) for question in questions]
    if mode == "latent":
        prompts = [prompt + [model.bot_id] for prompt in prompts]
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    sampling = dict(
        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
    )
    batches = _batches([len(prompt) for prompt in prompts], batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"generate ({mode})", unit="batch")
    outputs: list[GenerationOutput | None] = [None] * len(questions)
    was_training = model.training
    model.eval()  # dropout (LoRA, projection) off: greedy decoding must be deterministic
    try:
        with torch.inference_mode():
            for indices in batches:
                ids, latents = _generate_batch(
                    model,
                    [prompts[index] for index in indices],
                    mode,
                    num_latent,
                    max_new_tokens,
                    sampling,
                    return_latents,
                    min_new_tokens=min_new_tokens,
                    feed_answer_prompt=feed_answer_prompt,
                    latent_transform=latent_transform,
                )
                rows = ids.cpu().tolist()
                stacked = torch.stack(latents, dim=1).float().cpu() if latents else None
                for row_index, index in enumerate(indices):
                    outputs[index] = _make_output(
                        tokenizer,
                        rows[row_index],
                        num_latent if mode == "latent" else 0,
                        stacked[row_index] if stacked is not None else None,
                    )
    finally:
        model.train(was_training)
    return outputs  # type: ignore[return-value]


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

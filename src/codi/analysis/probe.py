"""Probing the latent thoughts (docs/method.md#probing; paper §5 and Table 3).

For every question the latent loop is run once and, at each of the num_latent + 1 positions (after
`<bot>` and after each latent thought), the LM head is applied to:

    top        the last-layer hidden state BEFORE the projection (the reference's probe), (B, d)
    projected  optionally, the projected latent that is fed next (prj(h), an input embedding), (B, d);
               the LM head is applied to it as is (no final norm): for tied heads this ranks tokens by
               their embedding's dot product with the latent
    lens       optionally, a logit lens: every entry of `hidden_states` (embedding output and each
               block's output) through the model's final norm and the LM head

The records and the paper's Table-3 metric are in `codi.analysis.probe_metric`; plots and HTML in `codi.report`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..data.dataset import DataError, answer_value, encode_question, pad_sequences
from ..report import write_report
from .probe_metric import PositionProbe, ProbeRecord, TopK, as_number, reference_steps, summarize

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Probing


def find_final_norm(hf_model: nn.Module) -> nn.Module | None:
    """The body's final norm for the logit lens: its last direct child whose class name has "Norm".

    Found generically (GPT-2 `ln_f`, LLaMA/Qwen/Mistral `norm`, Phi `final_layernorm`); transformers'
    last `hidden_states` entry already has it applied, so the lens applies it to the others only.
    """
    body = getattr(hf_model, "base_model", hf_model)
    norms = [module for module in body.children() if "norm" in type(module).__name__.lower()]
    return norms[-1] if norms else None


class _Decoder:
    """Top-k of the LM head over (N, d) states, with a cache of decoded token strings."""

    def __init__(self, model, top_k: int):
        self.head = model.hf_model.get_output_embeddings()
        self.tokenizer = model.tokenizer
        self.top_k = top_k
        self.texts: dict[int, str] = {}

    def __call__(self, states: torch.Tensor) -> list[TopK]:
        logits = self.head(states.to(self.head.weight.dtype)).float()  # (N, V)
        probs, ids = logits.softmax(-1).topk(min(self.top_k, logits.shape[-1]), dim=-1)
        result = []
        for row_ids, row_probs in zip(ids.tolist(), probs.tolist()):
            for token in row_ids:
                if token not in self.texts:
                    self.texts[token] = self.tokenizer.decode([token])
            result.append(TopK([self.texts[t] for t in row_ids], row_ids, [round(p, 6) for p in row_probs]))
        return result


def _as_item(index: int, item) -> tuple[str, str, str | None]:
    """(question, cot, gold value) of a question string, a RawRecord-like object or a dict."""
    if isinstance(item, str):
        return item, "", None
    get = item.get if isinstance(item, dict) else (lambda key, default=None: getattr(item, key, default))
    question, answer = get("question"), get("answer", None)
    if not isinstance(question, str):
        where = get("where", None) or f"item {index}"
        raise DataError(f"probe: {where} has no question text (got {type(question).__name__})")
    return question, get("cot", "") or "", answer_value(str(answer)) if answer is not None else None


@torch.no_grad()
def _probe_batch(model, decoder: _Decoder, questions, num_latent, after_projection, logit_lens, norm):
    """Probe one batch; returns per question (positions, latent cosine matrix)."""
    prompts = [encode_question(model.tokenizer, q) + [model.bot_id] for q in questions]
    input_ids = pad_sequences(prompts, model.pad_id, "left").to(model.device)
    mask = pad_sequences([[1] * len(p) for p in prompts], 0, "left").to(model.device)
    prefix = model.encode_latents(
        input_ids, mask, num_latent, keep_hidden=True, defer_last=False, keep_all_layers=logit_lens
    )
    batch, num_positions = len(questions), len(prefix.hidden)
    hidden = torch.stack(prefix.hidden, 1).float()  # (B, P, d)
    top = decoder(hidden.reshape(batch * num_positions, -1))
    latents = torch.stack(prefix.latents, 1).float() if prefix.latents else hidden[:, :0]  # (B, N, d)
    projected = decoder(latents.reshape(-1, latents.shape[-1])) if after_projection and num_latent else []
    lens = []  # per position: per layer (B) TopK lists
    for layers in prefix.all_hidden:
        per_layer = []
        for index, state in enumerate(layers):  # state (B, d)
            if norm is not None and index < len(layers) - 1:
                state = norm(state)
            per_layer.append(decoder(state))
        lens.append(per_layer)
    unit = latents / latents.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = (unit @ unit.transpose(1, 2)).tolist()  # (B, N, N)
    hidden_norms, latent_norms = hidden.norm(dim=-1).tolist(), latents.norm(dim=-1).tolist()
    results = []
    for row in range(batch):
        positions = []
        for p in range(num_positions):
            positions.append(
                PositionProbe(
                    position=p,
                    top=top[row * num_positions + p],
                    projected=projected[row * num_latent + p] if projected and p < num_latent else None,
                    lens=[layer[row] for layer in lens[p]] if logit_lens else None,
                    hidden_norm=round(hidden_norms[row][p], 4),
                    latent_norm=round(latent_norms[row][p], 4) if p < num_latent else None,
                )
            )
        results.append((positions, [[round(c, 5) for c in line] for line in cosine[row]]))
    return results


def probe(
    model,
    records_or_questions: Sequence,
    *,
    top_k: int = 5,
    batch_size: int = 16,
    num_latent: int | None = None,
    after_projection: bool = False,
    logit_lens: bool = False,
    predict: bool = True,
    max_new_tokens: int = 256,
    progress: bool = False,
) -> list[ProbeRecord]:
    """Probe the latent thoughts of a `CODIModel` for each question (see the module docstring).

    `records_or_questions`: question strings, or records with `question` (and `cot`, `answer`: RawRecord
    or dicts). `num_latent` defaults to `model.args.num_latent`. With `predict` the answers
    are generated greedily (`codi.inference.generate`) and scored against the gold value. No weight is changed
    and the model's train/eval mode is restored.
    """
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k and batch_size must be >= 1, got {top_k}, {batch_size}")
    num_latent = model.args.latents(num_latent)
    items = [_as_item(index, item) for index, item in enumerate(records_or_questions)]
    indices, items = _fitting(model, items, num_latent)
    decoder = _Decoder(model, top_k)
    norm = find_final_norm(model.hf_model) if logit_lens else None
    was_training = model.training
    model.eval()
    try:
        from tqdm import tqdm

        probed = []
        starts = range(0, len(items), batch_size)
        for start in tqdm(starts, desc="probe", unit="batch", disable=not progress):
            chunk = [question for question, _, _ in items[start : start + batch_size]]
            probed.extend(_probe_batch(model, decoder, chunk, num_latent, after_projection, logit_lens, norm))
        outputs = [None] * len(items)
        if predict and items:
            from ..inference.generate import generate

            questions = [question for question, _, _ in items]
            outputs = generate(
                model,
                questions,
                num_latent=num_latent,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                progress=progress,
            )
    finally:
        model.train(was_training)
    return [  # each record keeps its input's index (skipped questions leave gaps)
        _make_record(index, item, positions, cosine, output, model.tokenizer)
        for index, item, (positions, cosine), output in zip(indices, items, probed, outputs)
    ]


def _fitting(model, items: list, num_latent: int) -> tuple[list[int], list]:
    """(input indices, items) of the questions that fit the model's positions with its latents; the
    others are dropped, counted and named in a warning (a learned position table fails past its size)."""
    from ..inference.evaluate import refuse_if_none_fit
    from ..inference.generate import unfit_questions

    unfit = unfit_questions(model, [question for question, _, _ in items], num_latent=num_latent)
    refuse_if_none_fit(unfit, len(items), "probe")
    if unfit:
        first = next(iter(unfit.items()))
        logger.warning("probe: %d question(s) skipped (first: #%d, %s)", len(unfit), first[0], first[1])
    kept = [index for index in range(len(items)) if index not in unfit]
    return kept, [items[index] for index in kept]


def _make_record(index, item, positions, cosine, output, tokenizer) -> ProbeRecord:
    question, cot, gold = item
    record = ProbeRecord(
        question=question,
        positions=positions,
        steps=reference_steps(cot, tokenizer),
        index=index,
        cot=cot,
        gold=gold,
        latent_cosine=cosine,
    )
    if output is not None:
        from ..inference.scoring import extract_answer, is_correct

        record.predicted_text = output.text
        record.predicted = extract_answer(output.text)
        gold_value = as_number(gold) if gold else None
        if gold_value is not None:
            record.correct = is_correct(record.predicted, gold_value)
    return record


# --------------------------------------------------------------------------------------------------
# In one call


def run_probe(
    model,
    records_or_questions: Sequence,
    out_dir: str,
    *,
    title: str = "",
    metadata: dict | None = None,
    **kwargs,
) -> dict:
    """Probe, summarise and write the report in one call; `model` is a `CODIModel` or a checkpoint
    directory. `metadata` is merged into the summary (e.g. model and data paths); kwargs go to `probe`.
    Returns the summary with the written file paths under "paths"."""
    if isinstance(model, str):
        from ..io.loader import load

        metadata = {"model": model, **(metadata or {})}
        title = title or f"CODI probe: {model}"
        model = load(model)
    records = probe(model, records_or_questions, **kwargs)
    summary = {**(metadata or {}), **summarize(records)}
    summary["paths"] = write_report(records, summary, out_dir, title=title)
    return summary

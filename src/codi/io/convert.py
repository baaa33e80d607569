"""Load the authors' released CODI checkpoints (docs/method.md#reference-checkpoints) and convert them to this project's format.

The reference saves the state dict of its whole wrapper module in ONE file (`pytorch_model.bin` or
`model.safetensors`):

- `codi.base_model.model.<HF keys>` when the LM is peft-wrapped (LoRA), with `...<module>.base_layer.weight`
  for wrapped modules and `...<module>.lora_A.default.weight` / `lora_B.default.weight`;
  `codi.<HF keys>` for full fine-tuning (no peft wrapper);
- the input embedding and LM head with V+3 rows, V = the base config's vocab size: pad = V, bot = V+1,
  eot = V+2 (appended whatever the tokenizer holds);
- `prj.1.*`, `prj.3.*` (the projection's two Linear layers) and `prj.ln.*` (its LayerNorm, absent
  with `prj_no_ln`).

This project adds `<pad>` only when the tokenizer lacks one, then `<bot>`, `<eot>` as tokenizer tokens,
so its ids equal the reference's (V, V+1, V+2) for GPT-2 and Llama-3.2 (no pad, len(tokenizer) == V)
but may differ for other tokenizers. The loader therefore copies embedding / LM-head rows BY TOKEN:
rows 0..V-1 as they are, the reference's bot row V+1 onto our `<bot>` id, eot V+2 onto our `<eot>` id,
and pad V onto our `<pad>` id only when we added it (a tokenizer's own pad keeps its row, as in the
reference, which also used the tokenizer's pad when there was one). Rows this project does not use
are reported; nothing is silently dropped.

The checkpoint also holds the frozen base weights. The converted LoRA checkpoint stores only the
adapter, projection and added rows and rebuilds the rest from `--base_model`, so the loader compares
the checkpoint's frozen weights with that base model and refuses to convert on a mismatch (e.g.
Llama-3.2-1B given for a checkpoint trained on Llama-3.2-1B-Instruct) unless `merge_lora` writes a
self-contained full-weight checkpoint instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any

import torch

from ..config import CODIModelArguments
from ..model import CODIModel
from .hf import load_tokenizer
from .reference_weights import (
    LM_PREFIX,
    LORA_KEY,
    PRJ_PREFIX,
    ConversionReport,
    inspect_reference_state,
    normalize_reference_keys,
    read_state_dict,
    resolve_checkpoint_files,
)

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
NUM_ADDED_ROWS = 3  # pad, bot, eot
# Non-persistent in current transformers but saved by some older versions; they carry no weights.
HARMLESS_BUFFERS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")

# The released checkpoints and the base model each was trained from (the LoRA scale alpha=32 and the
# projection sizes come from the authors' scripts; r and prj_dim are re-read from the weights anyway).
KNOWN_CHECKPOINTS: dict[str, dict[str, Any]] = {
    "zen-E/CODI-gpt2": {"base_model": "gpt2", "lora_alpha": 32},
    # Trained on the Instruct model (train_llama1b_gsm8k-aug.sh); the authors' test script names the
    # non-Instruct base, whose frozen weights differ: the base-weight check below catches that.
    "zen-E/CODI-llama3.2-1b-Instruct": {"base_model": "meta-llama/Llama-3.2-1B-Instruct", "lora_alpha": 32},
}


# --------------------------------------------------------------------------------------------------
# Loading


def _resolve_settings(
    path_or_hub_id: str, info: dict[str, Any], base_model: str | None, explicit: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Merge known-checkpoint defaults < inferred values < explicit arguments; check contradictions."""
    known = KNOWN_CHECKPOINTS.get(path_or_hub_id.rstrip("/"), {})
    base_model = base_model or known.get("base_model")
    if not base_model:
        raise ValueError(
            f"{path_or_hub_id}: pass base_model (the hub id or folder of the LM the checkpoint was trained "
            f"from; known checkpoints: {sorted(KNOWN_CHECKPOINTS)})"
        )
    settings = {key: value for key, value in known.items() if key != "base_model"}
    settings.update({key: value for key, value in info.items() if key in _MODEL_FIELDS})
    if explicit.get("use_lora") is not None and explicit["use_lora"] != info["use_lora"]:
        layout = "LoRA" if info["use_lora"] else "full fine-tuning (no lora_A/lora_B keys)"
        raise ValueError(f"use_lora={explicit['use_lora']} but the checkpoint is {layout}")
    if explicit.get("use_prj") is None and not info["use_prj"]:
        raise ValueError(
            f"{path_or_hub_id}: the checkpoint has no projection (no '{PRJ_PREFIX}1.weight' / "
            f"'{PRJ_PREFIX}3.weight'); every released CODI checkpoint has one. Pass use_prj=False only "
            "if it was trained with --use_prj False"
        )
    settings.update({key: value for key, value in explicit.items() if value is not None})
    return base_model, settings


_MODEL_FIELDS = {f.name for f in dataclasses.fields(CODIModelArguments)}


def load_reference_checkpoint(
    path_or_hub_id: str,
    base_model: str | None = None,
    *,
    prj_dim: int | None = None,
    use_prj: bool | None = None,
    prj_no_ln: bool | None = None,
    use_lora: bool | None = None,
    lora_r: int | None = None,
    lora_alpha: int | None = None,
    lora_target_modules: list[str] | None = None,
    num_latent: int | None = None,
    inf_latent_iterations: int | None = None,
    dtype: str = "float32",
    revision: str | None = None,
    strict: bool = False,
    **model_args: Any,
) -> CODIModel:
    """Build a `CODIModel` holding the weights of an authors' reference checkpoint.

    path_or_hub_id: a `pytorch_model.bin` / `model.safetensors` file, a folder holding one, or a hub
        repo id (`zen-E/CODI-gpt2`, `zen-E/CODI-llama3.2-1b-Instruct`), fetched with huggingface_hub.
    base_model: the LM it was trained from (architecture, tokenizer, and under LoRA the weights the
        converted checkpoint will be rebuilt from); defaults for the known hub ids.
    The other settings are inferred from the weights where possible (use_lora, lora_r, LoRA targets,
        prj_dim, prj_no_ln, use_prj); explicit values override. lora_alpha cannot be read from the weights:
        default 32, the authors' value. Remaining keyword arguments go to `CODIModelArguments`.
    strict: also refuse unused checkpoint keys and model keys absent from the checkpoint.

    Returns the model in eval mode; `model.conversion_report` (a `ConversionReport`) lists every unused
    or missing key. Raises ValueError when a shape or the vocabulary size does not fit (naming the key
    and both shapes), when the projection is missing, or when LoRA tensors are missing.
    """
    files = resolve_checkpoint_files(path_or_hub_id, revision)
    logger.info("reading reference checkpoint %s", ", ".join(files))
    state, key_notes = normalize_reference_keys(read_state_dict(files))
    info = inspect_reference_state(state)
    explicit = {
        "prj_dim": prj_dim,
        "use_prj": use_prj,
        "prj_no_ln": prj_no_ln,
        "use_lora": use_lora,
        "lora_r": lora_r,
        "lora_alpha": lora_alpha,
        "lora_target_modules": lora_target_modules,
        "num_latent": num_latent,
        "inf_latent_iterations": inf_latent_iterations,
        "dtype": dtype,
        **model_args,
    }
    base_model, settings = _resolve_settings(path_or_hub_id, info, base_model, explicit)
    args = CODIModelArguments(model_name_or_path=base_model, **settings)

    # Whether the tokenizer brings its own pad decides whether the reference's pad row is ours too.
    tokenizer_had_pad = load_tokenizer(args).pad_token is not None
    model = CODIModel.from_base(args)
    report = ConversionReport(
        source=files,
        base_model=base_model,
        use_lora=args.use_lora,
        inferred={key: value for key, value in info.items() if key in _MODEL_FIELDS},
        notes=key_notes,
    )
    if args.use_lora:  # the only setting the weights cannot tell
        report.notes.append(
            f"lora_alpha={args.lora_alpha} (LoRA scale {args.lora_alpha / args.lora_r:g}) is not stored in "
            "the checkpoint: the authors' scripts use 32; pass lora_alpha if it was trained otherwise"
        )
    _load_lm(model, state, report, tokenizer_had_pad)
    _load_projection(model, state, report)
    report.unused_keys = sorted(report.unused_keys)
    _check_and_log(report, strict)
    model.conversion_report = report
    model.eval()
    return model


def _check_and_log(report: ConversionReport, strict: bool) -> None:
    if strict and (report.unused_keys or report.missing_keys):
        raise ValueError(f"strict loading failed:\n{report.summary()}")
    for line in report.summary().splitlines():
        logger.info(line)
    if report.unused_keys or report.missing_keys:
        logger.warning(
            "reference checkpoint: %d unused key(s), %d model key(s) not in the checkpoint (listed above)",
            len(report.unused_keys),
            len(report.missing_keys),
        )
    if report.base_mismatch:
        logger.warning(
            "%d frozen weight(s) of the checkpoint differ from %s: is it the base model the checkpoint was "
            "trained from? (first: %s)",
            len(report.base_mismatch),
            report.base_model,
            report.base_mismatch[0],
        )


def _embedding_keys(model: CODIModel) -> tuple[str, str | None, bool]:
    """Names (in `model.lm.state_dict()`) of the input-embedding and LM-head weights; whether tied."""
    inputs = model.hf_model.get_input_embeddings()
    outputs = model.hf_model.get_output_embeddings()
    names = {id(module): name for name, module in model.lm.named_modules()}
    input_key = f"{names[id(inputs)]}.weight"
    output_key = f"{names[id(outputs)]}.weight" if outputs is not None else None
    tied = outputs is not None and outputs.weight is inputs.weight
    return input_key, output_key, tied


def _row_map(
    model: CODIModel, vocab: int, tokenizer_had_pad: bool, report: ConversionReport
) -> dict[int, int]:
    """Our row -> reference row for the added tokens (rows below V map to themselves)."""
    mapping = {model.bot_id: vocab + 1, model.eot_id: vocab + 2}
    report.token_rows = {"bot": [vocab + 1, model.bot_id], "eot": [vocab + 2, model.eot_id]}
    if tokenizer_had_pad:
        report.unused_rows = [vocab]
        report.notes.append(
            f"the tokenizer has its own pad (id {model.pad_id}); the reference pad row {vocab} is not used "
            "(the reference also pads with the tokenizer's pad in that case)"
        )
    else:
        mapping[model.pad_id] = vocab
        report.token_rows = {"pad": [vocab, model.pad_id], **report.token_rows}
    return mapping


def _check_rows(key: str, target: torch.Tensor, source: torch.Tensor, vocab: int) -> None:
    """An embedding / LM-head matrix of the reference must have V+3 rows of this model's width."""
    if (
        source.dim() != target.dim()
        or source.shape[1:] != target.shape[1:]
        or source.shape[0] != vocab + NUM_ADDED_ROWS
    ):
        raise ValueError(
            f"{LM_PREFIX}{key}: checkpoint shape {tuple(source.shape)} does not fit this model's "
            f"{tuple(target.shape)}: expected {vocab + NUM_ADDED_ROWS} rows (the base model's vocabulary "
            f"V={vocab} plus pad, bot, eot) and width {target.shape[1]}. Wrong base model?"
        )


def _copy_rows(target: torch.Tensor, source: torch.Tensor, vocab: int, mapping: dict[int, int]) -> None:
    """Copy a matrix with V+3 reference rows onto our row layout (see the module docstring)."""
    with torch.no_grad():
        target[:vocab].copy_(source[:vocab])
        for ours, theirs in mapping.items():
            target[ours].copy_(source[theirs])


def _differs(checkpoint: torch.Tensor, current: torch.Tensor) -> bool:
    """Whether a frozen checkpoint weight is not the base model's (up to the checkpoint's rounding)."""
    rounded = current.detach().to(checkpoint.dtype).float()
    return not torch.allclose(checkpoint.float(), rounded, rtol=1e-2, atol=1e-3)


def _load_lm(
    model: CODIModel, state: dict[str, torch.Tensor], report: ConversionReport, had_pad: bool
) -> None:
    """Map `codi.*` tensors onto `model.lm` (the PeftModel or the HF model)."""
    prefix = LM_PREFIX + (PEFT_PREFIX if model.is_lora else "")
    if model.is_lora and not any(key.startswith(prefix) for key in state):
        raise ValueError(f"LoRA checkpoint without {prefix!r} keys: not the peft-wrapped reference layout")
    lm_state = model.lm.state_dict(keep_vars=True)
    input_key, output_key, tied = _embedding_keys(model)
    vocab = model.base_vocab_rows
    mapping = _row_map(model, vocab, had_pad, report)
    consumed: set[str] = set()

    def checkpoint_key(key: str) -> str:
        return LM_PREFIX + key

    embedding_keys = [key for key in (input_key, output_key) if key is not None]
    # Tied: the reference calls tie_weights() after loading, so the input embedding decides both; the
    # LM-head copy is used only when the input copy is absent.
    to_load = [key for key in embedding_keys if checkpoint_key(key) in state]
    if tied:
        to_load = to_load[:1]
    for key in embedding_keys:
        if checkpoint_key(key) not in state and not (tied and to_load):
            report.missing_keys.append(key)
    for key in to_load:
        source, target = state[checkpoint_key(key)], lm_state[key]
        _check_rows(key, target, source, vocab)
        if model.is_lora and _differs(source[:vocab], target[:vocab]):
            report.base_mismatch.append(key)
        _copy_rows(target, source, vocab, mapping)
        report.loaded += 1
    for key in embedding_keys:
        if checkpoint_key(key) in state:
            consumed.add(checkpoint_key(key))
            if (
                tied
                and key not in to_load
                and not torch.equal(state[checkpoint_key(key)], state[checkpoint_key(to_load[0])])
            ):
                report.notes.append(
                    f"{checkpoint_key(key)} differs from the tied {checkpoint_key(to_load[0])}; "
                    "ignored, as the reference's tie_weights() does"
                )

    lora_missing = []
    with torch.no_grad():
        for key, target in lm_state.items():
            if key in embedding_keys:
                continue
            source = state.get(checkpoint_key(key))
            if source is None:
                (lora_missing if LORA_KEY.match(key) else report.missing_keys).append(key)
                continue
            if source.shape != target.shape:
                raise ValueError(
                    f"{checkpoint_key(key)}: checkpoint shape {tuple(source.shape)} != this model's "
                    f"{tuple(target.shape)} (wrong base model or LoRA settings?)"
                )
            is_lora_tensor = bool(LORA_KEY.match(key))
            if model.is_lora and not is_lora_tensor and _differs(source, target):
                report.base_mismatch.append(key)
            target.copy_(source)
            consumed.add(checkpoint_key(key))
            report.loaded += 1
    if lora_missing:
        raise ValueError(
            f"{len(lora_missing)} LoRA tensor(s) of this model are not in the checkpoint (first: "
            f"{lora_missing[0]}); check lora_target_modules"
        )
    for key in state:
        if key.startswith(PRJ_PREFIX) or key in consumed:
            continue
        (report.ignored_buffers if HARMLESS_BUFFERS.search(key) else report.unused_keys).append(key)

    # Rows this project saves beside the adapter (`added_input_embeddings`) start at base_vocab_rows:
    # lower it when an added token landed inside the base vocabulary, so its reference row is saved.
    model.base_vocab_rows = min([vocab, *mapping])


def _load_projection(model: CODIModel, state: dict[str, torch.Tensor], report: ConversionReport) -> None:
    """`prj.1.*`, `prj.3.*`, `prj.ln.*` -> `model.prj`; every tensor of our projection must be present."""
    checkpoint = {key[len(PRJ_PREFIX) :]: value for key, value in state.items() if key.startswith(PRJ_PREFIX)}
    ours = model.prj.state_dict(keep_vars=True)
    missing = sorted(set(ours) - set(checkpoint))
    if missing:
        raise ValueError(
            f"the checkpoint's projection is incomplete: missing {[PRJ_PREFIX + key for key in missing]} "
            f"(has {sorted(PRJ_PREFIX + key for key in checkpoint)}); prj_no_ln={model.args.prj_no_ln}"
        )
    with torch.no_grad():
        for key, target in ours.items():
            source = checkpoint[key]
            if source.shape != target.shape:
                raise ValueError(
                    f"{PRJ_PREFIX}{key}: checkpoint shape {tuple(source.shape)} != this model's "
                    f"{tuple(target.shape)} (prj_dim={model.args.prj_dim}, hidden size "
                    f"{model.hf_model.get_input_embeddings().weight.shape[1]})"
                )
            target.copy_(source)
            report.loaded += 1
    report.unused_keys.extend(PRJ_PREFIX + key for key in sorted(set(checkpoint) - set(ours)))


# --------------------------------------------------------------------------------------------------
# Converting


def merge_lora(model: CODIModel) -> None:
    """Fold the LoRA weights into the base weights, so the model saves as self-contained full weights."""
    if not model.is_lora:
        return
    model.lm = model.lm.merge_and_unload()
    model.args = dataclasses.replace(model.args, use_lora=False)


def convert_reference_checkpoint(
    path_or_hub_id: str,
    output_dir: str,
    base_model: str | None = None,
    *,
    merge: bool = False,
    allow_base_mismatch: bool = False,
    **kwargs: Any,
) -> ConversionReport:
    """Load a reference checkpoint and write it with `CODIModel.save_pretrained` (plus the report).

    A LoRA checkpoint is written as adapter + base model reference, so its frozen weights must equal
    `base_model`'s; otherwise this refuses, unless `merge` (full weights, no base model needed) or
    `allow_base_mismatch`.
    """
    model = load_reference_checkpoint(path_or_hub_id, base_model, **kwargs)
    report: ConversionReport = model.conversion_report
    if report.base_mismatch and model.is_lora and not merge and not allow_base_mismatch:
        raise ValueError(
            f"{len(report.base_mismatch)} frozen weight(s) of the checkpoint differ from the base model "
            f"{report.base_model} (first: {report.base_mismatch[0]}), and a converted LoRA checkpoint is "
            "rebuilt from that base: pass the base model it was trained from, or --merge_lora to write "
            "full weights"
        )
    if merge:
        merge_lora(model)
        report.notes.append("LoRA merged into the base weights: written as a full-weight checkpoint")
    model.save_pretrained(output_dir)
    with open(os.path.join(output_dir, "conversion_report.json"), "w") as handle:
        json.dump(report.to_dict(), handle, indent=2)
    logger.info("wrote %s", output_dir)
    return report

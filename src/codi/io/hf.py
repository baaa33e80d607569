"""Loading Hugging Face pieces: tokenizer, causal LM (hub id, local folder or GGUF), LoRA, special tokens.

Everything architecture-specific that CODI needs is here: the default LoRA targets per `model_type`
and whether they are GPT-2-style `Conv1D` layers. The method itself (`codi.model`) touches the LM only
through public API.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..config import CODIModelArguments
from . import hub

BOT_TOKEN, EOT_TOKEN, PAD_TOKEN = "<bot>", "<eot>", "<pad>"

# LoRA targets per architecture family (docs/method.md#model); matched on `config.model_type`.
_ATTENTION_AND_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj", "gate_proj"]
DEFAULT_LORA_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": _ATTENTION_AND_MLP,
    "qwen2": _ATTENTION_AND_MLP,
    "qwen3": _ATTENTION_AND_MLP,
    "mistral": _ATTENTION_AND_MLP,
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
}


class ModelLoadError(OSError):
    """A model, tokenizer or checkpoint could not be loaded; the message names the source."""


def torch_dtype(name: str):
    """`CODIModelArguments.dtype` name -> what `from_pretrained(dtype=...)` takes."""
    return name if name == "auto" else getattr(torch, name)


def max_positions(lm: nn.Module) -> int | None:
    """The LM's position limit (learned position tables fail past it), if its config states one."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(lm.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_tokenizer(args: CODIModelArguments, path: str | None = None):
    """The tokenizer of `path` (a checkpoint) or of the base model named by `args`."""
    source = path or args.tokenizer_name_or_path or args.model_name_or_path
    kwargs = {"trust_remote_code": args.trust_remote_code}
    if args.gguf_file and path is None and not args.tokenizer_name_or_path:
        kwargs["gguf_file"] = args.gguf_file
    return _load_or_explain(AutoTokenizer.from_pretrained, "tokenizer", source, kwargs)


def load_base_model(args: CODIModelArguments, path: str | None = None):
    """The causal LM of `path` (a full-weights checkpoint) or the base model named by `args`."""
    source = path or args.model_name_or_path
    kwargs = {"dtype": torch_dtype(args.dtype), "trust_remote_code": args.trust_remote_code}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if args.gguf_file and path is None:
        kwargs["gguf_file"] = args.gguf_file
    return _load_or_explain(AutoModelForCausalLM.from_pretrained, "model", source, kwargs)


def _load_or_explain(loader, what: str, source: str, kwargs: dict):
    """Call an HF `from_pretrained`, turning 'not found / hub unreachable' into one clear error.
    A hub id is loaded after one reachability check (codi.io.hub): offline, from the cache at once."""
    hub.prepare_hub_access(source)
    try:
        loaded = loader(source, **kwargs)
    except OSError as error:
        if not hub.is_local(source) and hub.offline_reason():
            raise ModelLoadError(hub.offline_message(what, source)) from error
        where = "local directory" if os.path.isdir(source) else "hub id (or missing local path)"
        raise ModelLoadError(
            f"cannot load the {what} from {source!r} ({where}): {str(error).splitlines()[0]} "
            "Pass an existing local directory, or a hub id with network access or a filled HF cache."
        ) from error
    hub.note_cache_use(what, source)
    return loaded


def add_special_tokens(tokenizer) -> tuple[int, int, int]:
    """Add `<pad>` (only when missing), `<bot>`, `<eot>` as special tokens; returns (pad, bot, eot) ids."""
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    vocab = tokenizer.get_vocab()
    missing = [token for token in (BOT_TOKEN, EOT_TOKEN) if token not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return (
        tokenizer.pad_token_id,
        tokenizer.convert_tokens_to_ids(BOT_TOKEN),
        tokenizer.convert_tokens_to_ids(EOT_TOKEN),
    )


def lora_targets(model: nn.Module, args: CODIModelArguments) -> list[str]:
    if args.lora_target_modules:
        return list(args.lora_target_modules)
    model_type = getattr(model.config, "model_type", "")
    if model_type not in DEFAULT_LORA_TARGETS:
        raise ValueError(
            f"no default LoRA targets for model_type {model_type!r}; pass --lora_target_modules "
            f"(known defaults: {sorted(DEFAULT_LORA_TARGETS)})"
        )
    return DEFAULT_LORA_TARGETS[model_type]


def _conv1d_targets(model: nn.Module, targets: list[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(
        isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in targets
        for name, module in model.named_modules()
    )


def wrap_lora(lm: nn.Module, args: CODIModelArguments) -> nn.Module:
    """`lm` with LoRA adapters (peft) on the architecture's default or the requested targets."""
    from peft import LoraConfig, get_peft_model

    targets = lora_targets(lm, args)
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        fan_in_fan_out=_conv1d_targets(lm, targets),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft reads the deprecated `is_gradient_checkpointing` property; not ours to fix.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        lm = get_peft_model(lm, config)
    if args.fused_lora:
        from codi.fused_lora import fuse_lora_layers

        fuse_lora_layers(lm)
    return lm


def build_lm(args: CODIModelArguments, path: str | None = None, vocab_rows: int | None = None):
    """(tokenizer with the special tokens added, LM resized to match and LoRA-wrapped when asked,
    the base model's embedding rows). `path`: a checkpoint folder to take the tokenizer (and, for full
    fine-tuning, the weights) from; `vocab_rows`: the row count the checkpoint was saved with."""
    tokenizer = load_tokenizer(args, path=path)
    lm = load_base_model(args, path=None if args.use_lora else path)
    base_rows = lm.get_input_embeddings().weight.shape[0]
    add_special_tokens(tokenizer)
    rows = vocab_rows if vocab_rows is not None else max(len(tokenizer), base_rows)
    if rows != base_rows:
        lm.resize_token_embeddings(rows)
    if args.use_lora:
        lm = wrap_lora(lm, args)
    return tokenizer, lm, base_rows

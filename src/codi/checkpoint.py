"""CODI checkpoints: an HF-style folder that `save_pretrained` writes and `from_pretrained` reads.

    adapter_model.safetensors + adapter_config.json   (LoRA)   or   model.safetensors + config.json
    codi_extra.safetensors   projection, trainable <bot>/<eot> rows, the added token rows under LoRA
    codi_config.json         format version, model arguments, vocabulary rows, special token ids
    tokenizer files

A mixin of `CODIModel` (like transformers' `PreTrainedModel`): it needs `lm`, `hf_model`, `prj`,
`tokenizer`, `args`, `base_vocab_rows`, the special ids and `special_token_embeddings`.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from .config import CODIModelArguments
from .hf import build_lm

CONFIG_NAME = "codi_config.json"
EXTRA_WEIGHTS_NAME = "codi_extra.safetensors"
FORMAT_VERSION = 1


def read_config(path: str) -> dict:
    """The parsed `codi_config.json` of a checkpoint folder; a clear error for anything else."""
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} is not a CODI checkpoint: {CONFIG_NAME} not found")
    with open(config_path) as handle:
        config = json.load(handle)
    if config.get("format") != "codi" or config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{config_path}: unsupported checkpoint format {config.get('format_version')}")
    return config


class CheckpointMixin:
    """save_pretrained / from_pretrained / load_weights for `CODIModel`."""

    def _extra_state(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Weights that neither the adapter nor the base checkpoint holds: projection, added token rows."""
        names = {id(p): n for n, p in self.named_parameters(remove_duplicate=False)}

        def full(param: torch.Tensor) -> torch.Tensor:
            # The gathered copy when one is given: FSDP / ZeRO-3 leave only a shard in `param`.
            if state_dict is None:
                return param.detach()
            if names.get(id(param)) not in state_dict:
                raise KeyError(f"gathered state dict lacks {names.get(id(param))!r}")
            return state_dict[names[id(param)]]

        if state_dict is None:
            state = {f"prj.{key}": value for key, value in self.prj.state_dict().items()}
        else:
            state = {key: value for key, value in state_dict.items() if key.startswith("prj.")}
        if self.special_token_embeddings is not None:
            state["special_token_embeddings"] = full(self.special_token_embeddings)
        if self.is_lora:
            input_rows = self.hf_model.get_input_embeddings().weight
            state["added_input_embeddings"] = full(input_rows)[self.base_vocab_rows :]
            output = self.hf_model.get_output_embeddings()
            # `is`, not data_ptr(): sharded (DTensor) parameters all report data_ptr() == 0.
            if output is not None and output.weight is not input_rows:
                state["added_output_embeddings"] = full(output.weight)[self.base_vocab_rows :]
        return {key: value.contiguous().cpu() for key, value in state.items()}

    def save_pretrained(self, output_dir: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """HF-style folder: adapter (LoRA) or full weights, `codi_extra.safetensors`, config, tokenizer.

        `state_dict` (keys as in `self.state_dict()`): write these tensors instead of the live ones; the
        HF Trainer passes the gathered full weights under FSDP and DeepSpeed ZeRO-3.
        """
        os.makedirs(output_dir, exist_ok=True)
        lm_state = None
        if state_dict is not None:
            lm_state = {key[3:]: value for key, value in state_dict.items() if key.startswith("lm.")}
        if self.is_lora:
            self.lm.save_pretrained(output_dir, save_embedding_layers=False, state_dict=lm_state)
        else:
            self.hf_model.save_pretrained(output_dir, state_dict=lm_state)
        save_file(self._extra_state(state_dict), os.path.join(output_dir, EXTRA_WEIGHTS_NAME))
        self.tokenizer.save_pretrained(output_dir)
        config = {
            "format": "codi",
            "format_version": FORMAT_VERSION,
            "model_args": self.args.to_dict(),
            "base_vocab_rows": self.base_vocab_rows,
            "vocab_rows": self.hf_model.get_input_embeddings().weight.shape[0],
            "special_token_ids": {"pad": self.pad_id, "bot": self.bot_id, "eot": self.eot_id},
            "model_type": getattr(self.hf_model.config, "model_type", None),
        }
        with open(os.path.join(output_dir, CONFIG_NAME), "w") as handle:
            json.dump(config, handle, indent=2)

    @staticmethod
    def read_config(path: str) -> dict:
        return read_config(path)

    @classmethod
    def from_pretrained(
        cls, path: str, base_model_name_or_path: str | None = None, dtype: str | None = None, **overrides
    ):
        """Load a checkpoint written by `save_pretrained`. LoRA checkpoints need their base model:
        the one recorded in `codi_config.json`, or `base_model_name_or_path`."""
        config = read_config(path)
        values = dict(config["model_args"])
        if base_model_name_or_path:
            values["model_name_or_path"] = base_model_name_or_path
        if dtype:
            values["dtype"] = dtype
        values.update(overrides)
        args = CODIModelArguments(**values)
        tokenizer, lm, _ = build_lm(args, path=path, vocab_rows=config["vocab_rows"])
        model = cls(lm, tokenizer, args, config["base_vocab_rows"])
        ids = config["special_token_ids"]
        if (model.pad_id, model.bot_id, model.eot_id) != (ids["pad"], ids["bot"], ids["eot"]):
            raise ValueError(
                f"{path}: tokenizer special ids {model.pad_id, model.bot_id, model.eot_id} != saved {ids}"
            )
        model.load_weights(path)
        model.eval()
        return model

    def load_weights(self, path: str) -> None:
        """Load the trained weights of a checkpoint into this (identically built) model; used to resume."""
        if self.is_lora:
            from peft import set_peft_model_state_dict
            from peft.utils import SAFETENSORS_WEIGHTS_NAME

            adapter = load_file(os.path.join(path, SAFETENSORS_WEIGHTS_NAME))
            result = set_peft_model_state_dict(self.lm, adapter)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"{path}: adapter keys not in this model: {unexpected[:5]}")
        else:
            self._load_full_weights(path)
        extra = load_file(os.path.join(path, EXTRA_WEIGHTS_NAME))
        with torch.no_grad():
            prj_state = {key[4:]: value for key, value in extra.items() if key.startswith("prj.")}
            self.prj.load_state_dict(prj_state, strict=True)
            if self.special_token_embeddings is not None:
                self.special_token_embeddings.copy_(extra["special_token_embeddings"])
            if "added_input_embeddings" in extra:
                weight = self.hf_model.get_input_embeddings().weight
                weight[self.base_vocab_rows :].copy_(extra["added_input_embeddings"])
            if "added_output_embeddings" in extra:
                weight = self.hf_model.get_output_embeddings().weight
                weight[self.base_vocab_rows :].copy_(extra["added_output_embeddings"])

    def _load_full_weights(self, path: str) -> None:
        from transformers.trainer_utils import load_sharded_checkpoint  # moved here in transformers 5

        if not os.path.isfile(os.path.join(path, "model.safetensors")):
            load_sharded_checkpoint(self.hf_model, path, strict=False)
            return
        result = self.hf_model.load_state_dict(
            load_file(os.path.join(path, "model.safetensors")), strict=False
        )
        # strict=False only for tied weights (the LM head is not saved); anything else missing or
        # unexpected means another model, which must not resume silently half-loaded.
        tied = getattr(self.hf_model, "_tied_weights_keys", None) or {}
        missing = [key for key in result.missing_keys if key not in tied]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{path}: weights do not match this model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        if self.hf_model.config.tie_word_embeddings:
            self.hf_model.tie_weights()

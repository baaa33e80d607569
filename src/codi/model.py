"""CODI model: one causal LM that is both the CoT teacher and the latent-thought student (SPEC §2-3).

`CODIModel` wraps any Hugging Face causal LM (optionally LoRA-wrapped by peft) plus the projection
MLP. It touches the LM only through public API (`get_input_embeddings`, `hidden_states`, `cache`),
never through architecture-specific attribute names.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from .config import DEFAULT_LORA_TARGETS, CODIModelArguments
from .losses import combine_losses, distillation_loss, gather_positions, latent_step_ce, next_token_ce

logger = logging.getLogger(__name__)

CONFIG_NAME = "codi_config.json"
EXTRA_WEIGHTS_NAME = "codi_extra.safetensors"
FORMAT_VERSION = 1
BOT_TOKEN, EOT_TOKEN, PAD_TOKEN = "<bot>", "<eot>", "<pad>"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


@dataclass
class LossSettings:
    """Training-time settings read by `CODIModel.forward` (set from the training arguments)."""

    method: str = "codi"
    distill_loss_type: str = "smooth_l1"
    distill_loss_factor: float = 1.0
    distill_loss_div_std: bool = False
    ref_loss_factor: float = 1.0
    # optional step supervision of the latents (not part of CODI; see losses.latent_step_ce); 0 = off
    latent_step_loss_factor: float = 0.0
    # The question is the same prefix of the teacher and the student sequences: under causal attention
    # its keys/values are the same, so the student reuses the teacher's instead of recomputing them
    # (exact up to float rounding; tests/test_speed_equivalence.py). Ignored with reference_compat.
    share_question: bool = True


# (step, latent (B, d)) -> the latent (B, d) to feed instead; see CODIModel.encode_latents
LatentTransform = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class LatentPrefix:
    """State after the question, `<bot>` and the latent thoughts, ready for the decoder tokens.

    cache: KV cache of everything fed so far.
    attention_mask: (B, past) the true padding mask of the cached positions.
    next_position: (B,) position id of the next input token per row.
    pending: (B, 1, d) the last latent embedding, not yet fed (it is fed together with the decoder
        tokens, saving one forward call), or None.
    hidden: last-layer states before the projection, after `<bot>` and after each fed latent (B, d);
        filled only when asked for (probing).
    latents: the latent embeddings fed or pending (B, d), in order.
    all_hidden: with `keep_all_layers`, for each entry of `hidden`, every entry of the LM's
        `hidden_states` (embedding output and each block's output, each (B, d)) at that position.
    """

    cache: DynamicCache
    attention_mask: torch.Tensor
    next_position: torch.Tensor
    pending: torch.Tensor | None
    hidden: list[torch.Tensor] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    all_hidden: list[tuple[torch.Tensor, ...]] = field(default_factory=list)


def build_projection(hidden_size: int, args: CODIModelArguments) -> nn.Module:
    """Dropout -> Linear(d, prj_dim) -> GELU -> Linear(prj_dim, d) [-> LayerNorm(d)].

    Sub-module names (`prj.1`, `prj.3`, `prj.ln`) match the reference checkpoints' keys.
    """
    if not args.use_prj:
        return nn.Identity()
    layers = OrderedDict(
        [
            ("0", nn.Dropout(args.prj_dropout)),
            ("1", nn.Linear(hidden_size, args.prj_dim)),
            ("2", nn.GELU()),
            ("3", nn.Linear(args.prj_dim, hidden_size)),
        ]
    )
    if not args.prj_no_ln:
        layers["ln"] = nn.LayerNorm(hidden_size)
    return nn.Sequential(layers)


def _conv1d_targets(model: nn.Module, targets: list[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(
        isinstance(module, Conv1D) and name.rsplit(".", 1)[-1] in targets
        for name, module in model.named_modules()
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


def load_tokenizer(args: CODIModelArguments, path: str | None = None):
    source = path or args.tokenizer_name_or_path or args.model_name_or_path
    kwargs = {"trust_remote_code": args.trust_remote_code}
    if args.gguf_file and path is None and not args.tokenizer_name_or_path:
        kwargs["gguf_file"] = args.gguf_file
    return _load_or_explain(AutoTokenizer.from_pretrained, "tokenizer", source, kwargs)


def load_base_model(args: CODIModelArguments, path: str | None = None):
    source = path or args.model_name_or_path
    kwargs = {"dtype": _DTYPES[args.dtype], "trust_remote_code": args.trust_remote_code}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    if args.gguf_file and path is None:
        kwargs["gguf_file"] = args.gguf_file
    return _load_or_explain(AutoModelForCausalLM.from_pretrained, "model", source, kwargs)


def _load_or_explain(loader, what: str, source: str, kwargs: dict):
    """Call an HF `from_pretrained`, turning 'not found / hub unreachable' into one clear error."""
    try:
        return loader(source, **kwargs)
    except OSError as error:
        where = "local directory" if os.path.isdir(source) else "hub id (or missing local path)"
        raise ModelLoadError(
            f"cannot load the {what} from {source!r} ({where}): {str(error).splitlines()[0]} "
            "Pass an existing local directory, or a hub id with network access or a filled HF cache."
        ) from error


class ModelLoadError(OSError):
    """A model, tokenizer or checkpoint could not be loaded; the message names the source."""


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


class CODIModel(nn.Module):
    """Teacher and student in one LM, plus the latent projection."""

    # The HF Trainer must divide the loss by the accumulation steps itself (see Trainer.training_step).
    accepts_loss_kwargs = False

    def __init__(self, lm: nn.Module, tokenizer, args: CODIModelArguments, base_vocab_rows: int):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.args = args
        self.base_vocab_rows = base_vocab_rows
        self.pad_id, self.bot_id, self.eot_id = add_special_tokens(tokenizer)
        hidden_size = self.hf_model.get_input_embeddings().weight.shape[1]
        self.prj = build_projection(hidden_size, args)
        self.special_token_embeddings = None
        if args.train_special_token_embeddings:
            rows = self.hf_model.get_input_embeddings().weight[[self.bot_id, self.eot_id]]
            self.special_token_embeddings = nn.Parameter(rows.detach().clone().float())
        self.loss_settings = LossSettings()

    # ----------------------------------------------------------------------------------------------
    # Construction, saving, loading

    @classmethod
    def from_base(cls, args: CODIModelArguments) -> CODIModel:
        """A fresh CODI model on top of a pretrained causal LM (hub id, local directory or GGUF)."""
        tokenizer = load_tokenizer(args)
        lm = load_base_model(args)
        base_rows = lm.get_input_embeddings().weight.shape[0]
        add_special_tokens(tokenizer)
        if len(tokenizer) > base_rows:
            lm.resize_token_embeddings(len(tokenizer))
        if args.use_lora:
            lm = _wrap_lora(lm, args)
        return cls(lm, tokenizer, args, base_rows)

    @property
    def hf_model(self) -> nn.Module:
        """The transformers model (with LoRA layers injected when peft wraps it)."""
        get_base = getattr(self.lm, "get_base_model", None)
        return get_base() if callable(get_base) else self.lm

    @property
    def is_lora(self) -> bool:
        return hasattr(self.lm, "peft_config")

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
        config_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path} is not a CODI checkpoint: {CONFIG_NAME} not found")
        with open(config_path) as handle:
            config = json.load(handle)
        if config.get("format") != "codi" or config.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{config_path}: unsupported checkpoint format {config.get('format_version')}")
        return config

    @classmethod
    def from_pretrained(
        cls, path: str, base_model_name_or_path: str | None = None, dtype: str | None = None, **overrides
    ) -> CODIModel:
        """Load a checkpoint written by `save_pretrained`. LoRA checkpoints need their base model:
        the one recorded in `codi_config.json`, or `base_model_name_or_path`."""
        config = cls.read_config(path)
        values = dict(config["model_args"])
        if base_model_name_or_path:
            values["model_name_or_path"] = base_model_name_or_path
        if dtype:
            values["dtype"] = dtype
        values.update(overrides)
        args = CODIModelArguments(**values)
        tokenizer = load_tokenizer(args, path=path)
        lm = load_base_model(args) if args.use_lora else load_base_model(args, path=path)
        if lm.get_input_embeddings().weight.shape[0] != config["vocab_rows"]:
            lm.resize_token_embeddings(config["vocab_rows"])
        if args.use_lora:
            lm = _wrap_lora(lm, args)
        model = cls(lm, tokenizer, args, config["base_vocab_rows"])
        ids = config["special_token_ids"]
        if (model.pad_id, model.bot_id, model.eot_id) != (ids["pad"], ids["bot"], ids["eot"]):
            raise ValueError(
                f"{path}: tokenizer special ids {model.pad_id, model.bot_id, model.eot_id} != saved {ids}"
            )
        model.load_weights(path)
        model.eval()
        return model

    @classmethod
    def from_reference_checkpoint(
        cls, path_or_hub_id: str, base_model: str | None = None, **kwargs
    ) -> CODIModel:
        """Load an authors' released checkpoint (SPEC §7: `zen-E/CODI-gpt2`, a local `pytorch_model.bin`,
        ...); see `codi.convert.load_reference_checkpoint` for the arguments and the mapping."""
        from .convert import load_reference_checkpoint

        return load_reference_checkpoint(path_or_hub_id, base_model, **kwargs)

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
            from transformers.trainer_utils import load_sharded_checkpoint  # moved here in transformers 5

            if os.path.isfile(os.path.join(path, "model.safetensors")):
                state = load_file(os.path.join(path, "model.safetensors"))
                result = self.hf_model.load_state_dict(state, strict=False)
                # strict=False only for tied weights (the LM head is not saved); anything else missing
                # or unexpected means another model, which must not resume silently half-loaded.
                tied = getattr(self.hf_model, "_tied_weights_keys", None) or {}
                missing = [key for key in result.missing_keys if key not in tied]
                if missing or result.unexpected_keys:
                    raise ValueError(
                        f"{path}: weights do not match this model: missing {missing[:5]}, "
                        f"unexpected {result.unexpected_keys[:5]}"
                    )
                if self.hf_model.config.tie_word_embeddings:
                    self.hf_model.tie_weights()
            else:
                load_sharded_checkpoint(self.hf_model, path, strict=False)
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

    # ----------------------------------------------------------------------------------------------
    # Building blocks shared by training, generation and probing

    @property
    def device(self) -> torch.device:
        return self.hf_model.get_input_embeddings().weight.device

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; the trainable `<bot>`/`<eot>` rows replace the frozen ones when enabled."""
        embeds = self.hf_model.get_input_embeddings()(input_ids)
        if self.special_token_embeddings is not None:
            special = self.special_token_embeddings.to(embeds.dtype)
            embeds = torch.where((input_ids == self.bot_id).unsqueeze(-1), special[0], embeds)
            embeds = torch.where((input_ids == self.eot_id).unsqueeze(-1), special[1], embeds)
        return embeds

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Latent thought from a last-layer state: prj(h), cast to the embedding dtype."""
        dtype = self.hf_model.get_input_embeddings().weight.dtype
        if isinstance(self.prj, nn.Identity):
            return hidden.to(dtype)
        return self.prj(hidden.to(self.prj[1].weight.dtype)).to(dtype)

    @property
    def masks_padding(self) -> bool:
        """False only when reproducing the reference's unmasked latent steps."""
        return not self.args.reference_compat

    def _lm_step(
        self,
        embeds,
        mask,
        positions,
        cache,
        *,
        all_logits: bool,
        hidden_states: bool = True,
        last_logits_only: bool = False,
    ):
        """One forward of the LM over `embeds` (B, T, d) continuing `cache`.

        Logits: all positions, the last only (`last_logits_only`: the LM head is a large share of a
        decoding step), or none.
        """
        if last_logits_only:
            keep = 1
        else:
            keep = 0 if all_logits else torch.empty(0, dtype=torch.long, device=embeds.device)
        return self.hf_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            output_hidden_states=hidden_states,
            logits_to_keep=keep,
        )

    def encode_latents(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_latent: int,
        keep_hidden: bool = False,
        defer_last: bool = True,
        keep_all_layers: bool = False,
        latent_transform: LatentTransform | None = None,
    ) -> LatentPrefix:
        """Run `Q ++ [bot]` (left-padded) and feed exactly `num_latent` latent thoughts.

        With `defer_last` (default mode only) the last latent is returned as `pending` and fed together
        with the decoder tokens, which saves one forward call. With `keep_hidden` (and not deferred)
        `prefix.hidden` holds num_latent + 1 states: after `<bot>` and after each latent. With
        `reference_compat` every latent is fed on its own, unmasked, at default positions.
        `keep_all_layers` (with `keep_hidden`) also fills `prefix.all_hidden` (logit lens).
        `latent_transform(step, latent)` replaces each projected latent (B, d) before it is fed
        (interventions, latent sampling); `step` counts from 0 (the latent made from `<bot>`).
        """
        compat = self.args.reference_compat
        positions = None if compat else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self._lm_step(
            self.embed(input_ids), attention_mask, positions, DynamicCache(), all_logits=False
        )
        prefix = LatentPrefix(
            cache=out.cache,
            attention_mask=attention_mask,
            next_position=attention_mask.long().sum(-1),
            pending=None,
        )
        return self._feed_latents(
            prefix, out, num_latent, keep_hidden, defer_last, keep_all_layers, latent_transform
        )

    def encode_latents_after_question(
        self,
        question_cache: DynamicCache,
        question_mask: torch.Tensor,
        bot_ids: torch.Tensor,
        num_latent: int,
        defer_last: bool = True,
        keep_hidden: bool = False,
    ) -> LatentPrefix:
        """Like `encode_latents`, but the question's keys/values come from `question_cache`.

        question_cache: a cache whose first Lq columns hold the (RIGHT-padded) questions, e.g. the
            teacher's cache, since every teacher sequence starts with its question; it is cropped to
            Lq in place. question_mask: (B, Lq) 1 on question tokens. bot_ids: (B, 1) `<bot>` ids.
        Under causal attention the keys/values of a question do not depend on what follows it, and the
        positions (question 0..q-1, `<bot>` at q) and the attended set (masked pads) are those of the
        left-padded `encode_latents`, so the result is the same up to float rounding, at the cost of
        one position per row instead of Lq + 1. Default mode only (not `reference_compat`).
        """
        if self.args.reference_compat:
            raise ValueError("encode_latents_after_question reproduces the default path only")
        # `crop(-n)` drops the last n columns (transformers >= 5.24 semantics)
        question_cache.crop(-(question_cache.get_seq_length() - question_mask.shape[1]))
        lengths = question_mask.long().sum(-1)
        mask = torch.cat([question_mask, question_mask.new_ones(question_mask.shape[0], 1)], dim=1)
        out = self._lm_step(self.embed(bot_ids), mask, lengths.unsqueeze(1), question_cache, all_logits=False)
        prefix = LatentPrefix(cache=out.cache, attention_mask=mask, next_position=lengths + 1, pending=None)
        return self._feed_latents(prefix, out, num_latent, keep_hidden, defer_last, False)

    def _feed_latents(
        self,
        prefix: LatentPrefix,
        out,
        num_latent: int,
        keep_hidden: bool,
        defer_last: bool,
        keep_all_layers: bool,
        latent_transform: LatentTransform | None = None,
    ) -> LatentPrefix:
        """The latent loop after `<bot>` (`out` is the LM output whose last position is `<bot>`)."""
        compat = self.args.reference_compat
        defer = defer_last and not compat
        last_hidden = out.hidden_states[-1][:, -1]
        attention_mask = prefix.attention_mask
        ones = attention_mask.new_ones(attention_mask.shape[0], 1)
        for step in range(num_latent):
            if keep_hidden:
                prefix.hidden.append(last_hidden)
                if keep_all_layers:
                    prefix.all_hidden.append(tuple(h[:, -1] for h in out.hidden_states))
            latent = self.project(last_hidden)
            if latent_transform is not None:
                latent = latent_transform(step, latent)
            latent = latent.unsqueeze(1)
            prefix.latents.append(latent[:, 0])
            if defer and step == num_latent - 1:
                prefix.pending = latent
                break
            step_mask = torch.cat([prefix.attention_mask, ones], dim=1)
            out = self._lm_step(
                latent,
                None if compat else step_mask,
                None if compat else prefix.next_position.unsqueeze(1),
                prefix.cache,
                all_logits=False,
            )
            prefix.cache, prefix.attention_mask = out.cache, step_mask
            prefix.next_position = prefix.next_position + 1
            last_hidden = out.hidden_states[-1][:, -1]
        else:
            if keep_hidden:
                prefix.hidden.append(last_hidden)
                if keep_all_layers:
                    prefix.all_hidden.append(tuple(h[:, -1] for h in out.hidden_states))
        return prefix

    def decode_step(
        self,
        prefix: LatentPrefix,
        input_ids: torch.Tensor,
        input_mask: torch.Tensor,
        hidden_states: bool = True,
        last_logits_only: bool = False,
    ):
        """Feed decoder tokens (B, T) after the prefix (and its pending latent); returns the LM output.

        When a latent was pending its output comes first, so decoder token t is at output index t+1
        (see `pending_offset`). The prefix is advanced in place. `last_logits_only`: logits of the last
        position only (greedy decoding needs no more).
        """
        embeds = self.embed(input_ids)
        mask = input_mask
        if prefix.pending is not None:
            embeds = torch.cat([prefix.pending, embeds], dim=1)
            mask = torch.cat([input_mask.new_ones(input_mask.shape[0], 1), input_mask], dim=1)
        full_mask = torch.cat([prefix.attention_mask, mask], dim=1)
        compat = self.args.reference_compat
        if compat:
            positions = None
            step_mask = full_mask if self.args.fix_attn_mask else None
        else:
            positions = prefix.next_position.unsqueeze(1) + (mask.long().cumsum(-1) - 1).clamp(min=0)
            step_mask = full_mask
        out = self._lm_step(
            embeds,
            step_mask,
            positions,
            prefix.cache,
            all_logits=True,
            hidden_states=hidden_states,
            last_logits_only=last_logits_only,
        )
        prefix.cache, prefix.attention_mask = out.cache, full_mask
        prefix.next_position = prefix.next_position + mask.long().sum(-1)
        prefix.pending = None
        return out

    # ----------------------------------------------------------------------------------------------
    # Training forward

    def teacher_forward(self, input_ids, attention_mask, use_cache: bool = False):
        """Teacher (CoT) forward; `use_cache` also returns its keys/values (to share the question)."""
        return self.hf_model(
            inputs_embeds=self.embed(input_ids),
            attention_mask=attention_mask,
            output_hidden_states=True,
            use_cache=use_cache,
        )

    def forward(
        self,
        teacher_input_ids: torch.Tensor,
        teacher_attention_mask: torch.Tensor,
        teacher_labels: torch.Tensor,
        teacher_distill_pos: torch.Tensor,
        student_input_ids: torch.Tensor | None = None,
        student_attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_labels: torch.Tensor | None = None,
        decoder_distill_pos: torch.Tensor | None = None,
        latent_step_labels: torch.Tensor | None = None,
        **unused,
    ) -> dict[str, torch.Tensor]:
        """Loss of one batch (see `CODICollator` for the layout); returns total and components."""
        settings = self.loss_settings
        share = settings.share_question and settings.method == "codi" and not self.args.reference_compat
        teacher = self.teacher_forward(teacher_input_ids, teacher_attention_mask, use_cache=share)
        teacher_ce = next_token_ce(teacher.logits, teacher_labels)
        if settings.method != "codi":
            zero = teacher_ce.new_zeros(())
            return {
                "loss": teacher_ce,
                "teacher_ce": teacher_ce.detach(),
                "student_ce": zero,
                "distill_loss": zero,
            }
        target_states = teacher.hidden_states
        if self.args.reference_compat:
            with torch.no_grad():  # the reference computes its targets in a second forward
                target_states = self.teacher_forward(teacher_input_ids, teacher_attention_mask).hidden_states
        teacher_vectors = [gather_positions(h, teacher_distill_pos).detach() for h in target_states]
        step_supervision = settings.latent_step_loss_factor > 0
        if step_supervision and latent_step_labels is None:
            raise ValueError(
                "latent_step_loss_factor > 0 needs batches with latent_step_labels "
                "(build the dataset with step_targets=True)"
            )

        if share:
            # The student's `Q ++ [bot]` is left-padded to Lq + 1 columns; the teacher's cache holds the
            # same questions right-padded in its first Lq columns (shapes only: no host sync).
            question_columns = student_input_ids.shape[1] - 1
            lengths = student_attention_mask.long().sum(-1, keepdim=True) - 1
            columns = torch.arange(question_columns, device=lengths.device).unsqueeze(0)
            prefix = self.encode_latents_after_question(
                teacher.cache,
                (columns < lengths).to(student_attention_mask.dtype),
                student_input_ids[:, -1:],
                self.args.num_latent,
                keep_hidden=step_supervision,
            )
        else:
            prefix = self.encode_latents(
                student_input_ids, student_attention_mask, self.args.num_latent, keep_hidden=step_supervision
            )
        offset = 1 if prefix.pending is not None else 0
        student = self.decode_step(prefix, decoder_input_ids, decoder_attention_mask)
        student_ce = next_token_ce(student.logits[:, offset:], decoder_labels)
        latent_step = None
        if step_supervision:
            # states at <bot> and after each latent; the last one is the pending latent's output
            states = prefix.hidden + ([student.hidden_states[-1][:, 0]] if offset else [])
            head = self.hf_model.get_output_embeddings()
            latent_step = latent_step_ce(head(torch.stack(states, dim=1)), latent_step_labels)
        student_vectors = [gather_positions(h, decoder_distill_pos + offset) for h in student.hidden_states]
        distill = distillation_loss(
            student_vectors,
            teacher_vectors,
            settings.distill_loss_type,
            settings.distill_loss_div_std,
            l2_std_twice=self.args.reference_compat,
        )
        losses = combine_losses(
            student_ce,
            teacher_ce,
            distill.loss,
            settings.distill_loss_factor,
            settings.ref_loss_factor,
            latent_step,
            settings.latent_step_loss_factor,
        )
        outputs = {
            "loss": losses.total,
            "student_ce": student_ce.detach(),
            "teacher_ce": teacher_ce.detach(),
            "distill_loss": distill.loss.detach(),
        }
        if latent_step is not None:
            outputs["latent_step_ce"] = latent_step.detach()
        return outputs

    # ----------------------------------------------------------------------------------------------
    # Inference

    def generate(self, questions, **kwargs):
        """Answer questions with latent reasoning (or `mode="cot"`); see `codi.generate.generate`."""
        from .generate import generate

        return generate(self, questions, **kwargs)


def _wrap_lora(lm: nn.Module, args: CODIModelArguments) -> nn.Module:
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
        return get_peft_model(lm, config)

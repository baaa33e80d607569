"""CODI checkpoints: an HF-style folder that `save_pretrained` writes and `from_pretrained` reads.

    adapter_model.safetensors + adapter_config.json   (LoRA)   or   model.safetensors + config.json
    codi_extra.safetensors   projection, trainable <bot>/<eot> rows, the added token rows under LoRA
    codi_config.json         format version, model arguments, training objective, vocabulary rows,
                             special token ids, the LoRA base's fingerprint, the versions that wrote it
    tokenizer files

    README.md                the model card (`codi.io.model_card`), unless the folder holds a README of its own

`codi_config.json` is written last, atomically: a folder without it is not a (complete) checkpoint.
Loading takes every option that grants code execution or depends on the machine (trust_remote_code,
dtype, attention kernel) from the caller, never from the file: a downloaded checkpoint cannot run code.

A mixin of `CODIModel` (like transformers' `PreTrainedModel`): it needs `lm`, `hf_model`, `prj`,
`tokenizer`, `args`, `objective`, `base_vocab_rows`, the special ids and `special_token_embeddings`.
It is huggingface_hub's `ModelHubMixin` with this format behind its hooks (`_save_pretrained`,
`_from_pretrained`, `generate_model_card`): `from_pretrained` takes a folder or a hub id (downloaded with
`snapshot_download`, or read from the HF cache when offline) and `push_to_hub` uploads a saved folder.
Which class a folder needs (CODI, Coconut, ...) is `codi.io.loader`'s business: `codi.load(path_or_id)`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict

import torch
from huggingface_hub import ModelCard, ModelHubMixin
from safetensors.torch import load_file, save_file

from ..config import CODIModelArguments
from ..losses import LossSettings, TrainingObjective
from . import checkpoint_checks, hub
from .checkpoint_checks import EXTRA_WEIGHTS_NAME, CheckpointError
from .hf import ModelLoadError, build_lm
from .model_card import build_model_card, keep_foreign_readme, model_card_info, write_model_card

logger = logging.getLogger(__name__)

CONFIG_NAME = "codi_config.json"
FORMAT_VERSION = 1
# Loading options of the machine that loads, never read from a checkpoint (code execution, hardware;
# compiling pays on a GPU, costs minutes on a CPU).
CALLER_OPTIONS = {
    "trust_remote_code": False,
    "dtype": "float32",
    "attn_implementation": "sdpa",
    "compile_layers": "",
}
_FINGERPRINT_SAMPLE = 4096  # values per tensor: enough to tell two trainings apart, cheap for 1B models


def write_json_atomically(path: str, value: dict) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over `path` (never half-written)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(value, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    """`safetensors.torch.load_file` with one clear line for a missing, truncated or corrupt file."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found (incomplete checkpoint?)")
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types for bad headers and sizes
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({error})") from error


def base_fingerprint(model, state_dict: dict[str, torch.Tensor] | None = None) -> str | None:
    """A hash of the frozen base weights that a LoRA checkpoint is rebuilt from: every non-LoRA weight
    but the embeddings (whose added rows the checkpoint stores), by name, shape and a strided sample of
    values rounded to bfloat16 (the same whether the base is loaded in float32 or bfloat16)."""
    embeddings = {id(model.hf_model.get_input_embeddings().weight)}
    if model.hf_model.get_output_embeddings() is not None:
        embeddings.add(id(model.hf_model.get_output_embeddings().weight))
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if not name.startswith("lm.") or "lora_" in name or id(param) in embeddings:
            continue
        if state_dict is not None and name not in state_dict:
            return None  # a sharded engine's gathered state under other names: no fingerprint, no check
        source = (state_dict[name] if state_dict is not None else param).detach()  # full, not a shard
        tensor = source.reshape(-1)
        sample = tensor[:: max(1, tensor.numel() // _FINGERPRINT_SAMPLE)][:_FINGERPRINT_SAMPLE]
        digest.update(f"{name}{tuple(source.shape)}".encode())
        digest.update(sample.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes())
    return digest.hexdigest()


def produced_by() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {"codi": __version__, "transformers": transformers.__version__, "torch": torch.__version__}


def read_config(path: str) -> dict:
    """The parsed `codi_config.json` of a checkpoint folder; a clear error for anything else."""
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} is not a CODI checkpoint: {CONFIG_NAME} not found")
    with open(config_path) as handle:
        try:
            config = json.load(handle)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{config_path}: truncated or corrupt JSON ({error})") from error
    if not isinstance(config, dict) or config.get("format") != "codi":
        raise CheckpointError(f"{config_path}: not a CODI checkpoint config")
    version = config.get("format_version", 0)
    if isinstance(version, int) and version > FORMAT_VERSION:  # a wrong type is check_config's
        raise CheckpointError(f"{config_path}: unsupported checkpoint format {config.get('format_version')}")
    checkpoint_checks.check_config(config, config_path)
    for key in ("model_args", "vocab_rows", "base_vocab_rows", "special_token_ids"):
        if key not in config:
            raise CheckpointError(f"{config_path}: missing key {key!r}")
    return config


HUB_OPTIONS = ("revision", "cache_dir", "force_download", "local_files_only", "token")


def resolve_checkpoint(
    source: str,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    force_download: bool = False,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> str:
    """The local folder of a checkpoint: `source` itself, or the hub repository `source` downloaded with
    `snapshot_download` (from the HF cache alone when offline or the hub is unreachable: codi.io.hub)."""
    source = os.path.expanduser(os.fspath(source))
    if os.path.isdir(source):
        return source
    if hub.is_local(source):
        raise FileNotFoundError(f"checkpoint folder not found: {source}")
    return hub.download_repo(
        source, "checkpoint", revision=revision, cache_dir=cache_dir, force_download=force_download,
        local_files_only=local_files_only, token=token,
    )  # fmt: skip


class CheckpointMixin(ModelHubMixin):
    """save_pretrained / from_pretrained / push_to_hub / load_weights for `CODIModel`."""

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

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        state_dict: dict[str, torch.Tensor] | None = None,
        *,
        config: dict | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict | None = None,
        **push_to_hub_kwargs,
    ) -> str | None:
        """HF-style folder: adapter (LoRA) or full weights, `codi_extra.safetensors`, config, tokenizer,
        model card. A README.md in the folder that this package did not write is kept as it was, and the
        card goes to MODEL_CARD.md instead (`codi.io.model_card`).

        `state_dict` (keys as in `self.state_dict()`): write these tensors instead of the live ones; the
        HF Trainer passes the gathered full weights under FSDP and DeepSpeed ZeRO-3.
        `model_card_kwargs`: for `codi.io.model_card.model_card_info` (datasets, eval_results, name).
        `push_to_hub`: then upload it to `repo_id` (default: the folder's name), see `push_to_hub`.
        """
        if config is not None:  # ModelHubMixin's config.json would clash with a full model's own
            raise ValueError("a CODI checkpoint keeps its settings in codi_config.json: config= is not taken")
        output_dir = os.fspath(save_directory)
        os.makedirs(output_dir, exist_ok=True)
        self._save_pretrained(output_dir, state_dict, model_card_kwargs)
        if push_to_hub:
            repo_id = repo_id or os.path.basename(os.path.abspath(output_dir))
            return self.push_to_hub(repo_id, model_card_kwargs=model_card_kwargs, **push_to_hub_kwargs)
        return None

    def _save_pretrained(
        self, save_directory, state_dict: dict | None = None, model_card_kwargs: dict | None = None
    ) -> None:
        """ModelHubMixin's saving hook: every file of the format, `codi_config.json` last."""
        output_dir = os.fspath(save_directory)
        lm_state = None
        if state_dict is not None:
            lm_state = {key[3:]: value for key, value in state_dict.items() if key.startswith("lm.")}
        with keep_foreign_readme(output_dir) as card_name:  # peft updates any README.md it finds
            if self.is_lora:
                self.lm.save_pretrained(output_dir, save_embedding_layers=False, state_dict=lm_state)
            else:
                self.hf_model.save_pretrained(output_dir, state_dict=lm_state)
            save_file(self._extra_state(state_dict), os.path.join(output_dir, EXTRA_WEIGHTS_NAME))
            self.tokenizer.save_pretrained(output_dir)
            write_model_card(output_dir, self.generate_model_card(**(model_card_kwargs or {})), card_name)
        model_args = {key: value for key, value in self.args.to_dict().items() if key not in CALLER_OPTIONS}
        config = {
            "format": "codi",
            "format_version": FORMAT_VERSION,
            "model_args": model_args,
            "objective": {"method": self.objective.method, "loss": asdict(self.objective.loss)},
            "base_vocab_rows": self.base_vocab_rows,
            "vocab_rows": self.hf_model.get_input_embeddings().weight.shape[0],
            "special_token_ids": {"pad": self.pad_id, "bot": self.bot_id, "eot": self.eot_id},
            "model_type": getattr(self.hf_model.config, "model_type", None),
            "base_fingerprint": base_fingerprint(self, state_dict) if self.is_lora else None,
            "produced_by": produced_by(),
        }
        write_json_atomically(os.path.join(output_dir, CONFIG_NAME), config)

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """This model's card (`codi.io.model_card`); kwargs: `model_card_info`'s (datasets, eval_results...)."""
        return build_model_card(model_card_info(self, **kwargs))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        base_model_name_or_path: str | None = None,
        dtype: str | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **model_kwargs,
    ):
        """Load a checkpoint written by `save_pretrained`: a folder, or a hub repository id (downloaded
        with `snapshot_download` at `revision`; offline or with the hub unreachable, from the HF cache).
        `codi.load` picks the class a checkpoint needs. LoRA checkpoints need their base model: the one
        recorded in `codi_config.json`, or `base_model_name_or_path`; its weights must be the ones the
        checkpoint was trained on (fingerprint) unless `allow_base_mismatch=True`.

        `trust_remote_code`, `dtype`, `attn_implementation` and `compile_layers` are the caller's: a value
        stored in the file is ignored (a downloaded checkpoint must not be able to run its own code here). Other
        `model_kwargs`: `CODIModelArguments` fields (e.g. `num_latent`, `reference_compat`). A file lacking
        a tensor the model needs (or holding one it lacks) is an error unless `allow_incomplete_weights=True`
        (`codi.io.checkpoint_checks`).
        """
        return cls._from_pretrained(
            model_id=os.fspath(pretrained_model_name_or_path), revision=revision, cache_dir=cache_dir,
            force_download=force_download, local_files_only=local_files_only, token=token,
            base_model_name_or_path=base_model_name_or_path, dtype=dtype, **model_kwargs,
        )  # fmt: skip

    @classmethod
    def _from_pretrained(
        cls, *, model_id, revision, cache_dir, force_download, local_files_only, token, **model_kwargs
    ):
        """ModelHubMixin's loading hook: the folder (downloaded if `model_id` is a hub id), then loaded."""
        folder = resolve_checkpoint(
            model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
            local_files_only=local_files_only, token=token,
        )  # fmt: skip
        return cls._load_folder(folder, **model_kwargs)

    @classmethod
    def _load_folder(
        cls,
        path: str,
        base_model_name_or_path: str | None = None,
        dtype: str | None = None,
        *,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        allow_base_mismatch: bool = False,
        allow_incomplete_weights: bool = False,
        **overrides,
    ):
        """`from_pretrained` from the local checkpoint folder `path` (its options)."""
        config = read_config(path)
        checkpoint_checks.check_files(path, config)  # the folder's files, before anything is built from it
        values = dict(config["model_args"])
        if values.pop("trust_remote_code", False) and not trust_remote_code:
            logger.warning(
                "%s: ignored trust_remote_code=true stored in %s (pass it yourself)", path, CONFIG_NAME
            )
        for key in CALLER_OPTIONS:
            values.pop(key, None)
        values.update(trust_remote_code=trust_remote_code, dtype=dtype or CALLER_OPTIONS["dtype"])
        values["attn_implementation"] = attn_implementation or CALLER_OPTIONS["attn_implementation"]
        if base_model_name_or_path:
            values["model_name_or_path"] = base_model_name_or_path
        values.update(overrides)
        try:
            args = CODIModelArguments(**values)
        except TypeError as error:
            raise CheckpointError(f"{os.path.join(path, CONFIG_NAME)}: bad model_args ({error})") from error
        try:
            tokenizer, lm, _ = build_lm(args, path=path, vocab_rows=config["vocab_rows"])
        except ModelLoadError as error:
            if not args.use_lora or base_model_name_or_path:
                raise
            raise ModelLoadError(
                f"{path}: its base model {args.model_name_or_path!r} (recorded at training) cannot be loaded; "
                f"if it moved, pass --base_model PATH (Python: base_model_name_or_path=). {error}"
            ) from error
        model = cls(lm, tokenizer, args, config["base_vocab_rows"], _objective(config))
        if model.is_lora and config.get("base_fingerprint") and not allow_base_mismatch:
            if base_fingerprint(model) != config["base_fingerprint"]:
                raise CheckpointError(
                    f"{path}: the base model {args.model_name_or_path!r} is not the one this LoRA checkpoint "
                    "was trained on (its frozen weights differ); pass the original with --base_model, or "
                    "--allow_base_mismatch to load anyway"
                )
        ids = config["special_token_ids"]
        if (model.pad_id, model.bot_id, model.eot_id) != (ids["pad"], ids["bot"], ids["eot"]):
            raise ValueError(
                f"{path}: tokenizer special ids {model.pad_id, model.bot_id, model.eot_id} != saved {ids}"
            )
        checkpoint_checks.check_weights(model, path, config, allow_incomplete_weights)
        model.load_weights(path, allow_incomplete_weights)
        model.eval()
        return model

    def load_weights(self, path: str, allow_incomplete: bool = False) -> None:
        """Load the trained weights of a checkpoint into this (identically built) model; used to resume.
        A missing or unexpected tensor is an error unless `allow_incomplete` (the caller was told which)."""
        if self.is_lora:
            from peft import set_peft_model_state_dict
            from peft.utils import SAFETENSORS_WEIGHTS_NAME

            adapter = load_safetensors(os.path.join(path, SAFETENSORS_WEIGHTS_NAME))
            result = set_peft_model_state_dict(self.lm, adapter)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"{path}: adapter keys not in this model: {unexpected[:5]}")
        else:
            self._load_full_weights(path, allow_incomplete)
        extra = load_safetensors(os.path.join(path, EXTRA_WEIGHTS_NAME))
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

    def _load_full_weights(self, path: str, allow_incomplete: bool = False) -> None:
        from transformers.trainer_utils import load_sharded_checkpoint  # moved here in transformers 5

        if os.path.isfile(os.path.join(path, "model.safetensors")):
            state = load_safetensors(os.path.join(path, "model.safetensors"))
            result = self.hf_model.load_state_dict(state, strict=False)
        else:
            result = load_sharded_checkpoint(self.hf_model, path, strict=False)
        # strict=False only for tied weights (the LM head is not saved); anything else missing or
        # unexpected means another model, which must not resume silently half-loaded.
        tied = getattr(self.hf_model, "_tied_weights_keys", None) or {}
        missing = [key for key in result.missing_keys if key not in tied]
        if (missing or result.unexpected_keys) and not allow_incomplete:
            raise ValueError(
                f"{path}: weights do not match this model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        if self.hf_model.config.tie_word_embeddings:
            self.hf_model.tie_weights()


def _objective(config: dict) -> TrainingObjective:
    """The training objective a checkpoint records (checkpoints from before it was recorded: CODI's)."""
    stored = config.get("objective") or {}
    loss = LossSettings(**stored.get("loss", {}))
    return TrainingObjective(method=stored.get("method", "codi"), loss=loss)

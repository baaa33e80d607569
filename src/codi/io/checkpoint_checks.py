"""Checks that a checkpoint is complete and consistent before its weights are trusted.

A half-loaded model evaluates without complaint: transformers and peft initialise whatever a file
lacks (a missing shard's rows are random, a missing LoRA B is zero, i.e. the bare base) and only log
it. So every tensor is accounted for by name before the weights are loaded, and the files that
describe the weights (`codi_config.json`, `adapter_config.json`, the tokenizer) are read and checked
against each other first. Each failure is one line naming the file and the key or tensors.

    check_config(config, config_path)            types of `codi_config.json` against its dataclasses
    check_files(path, config)                     weight, tokenizer, adapter files, before anything is built
    read_settings(path, cls)                      a method's settings file, e.g. `coconut_config.json`
    check_weights(model, path, config, allow)     tensor names of the weight files against the model
    require_latents(model, command)               a command that reads latents refuses other methods
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import types
import typing

from ..config import METHODS, CODIModelArguments
from ..losses import LossSettings

logger = logging.getLogger(__name__)

# Commands that read latent thoughts, and the methods whose checkpoints have them.
LATENT_METHODS = {"probe": ("codi",), "ablate": ("codi", "coconut")}
_CALLER_KEYS = ("trust_remote_code", "dtype", "attn_implementation", "compile_layers")  # dropped on load
EXTRA_WEIGHTS_NAME = "codi_extra.safetensors"  # the projection and added token rows (codi.io.checkpoint)
_ADAPTER_KEYS = {"r": "lora_r", "lora_alpha": "lora_alpha"}  # adapter_config.json key -> model_args key
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt, inconsistent or does not fit; the message names
    the file (re-exported by `codi.io.checkpoint`)."""


# --------------------------------------------------------------------------------------------------
# codi_config.json


def _matches(value, hint) -> bool:
    """Whether a JSON value fits a dataclass field's type (ints are not bools; ints are floats)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (typing.Any,)
        return isinstance(value, list) and all(_matches(element, item) for element in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # a type JSON cannot express: left to the dataclass


def _check_fields(values, cls, where: str, skip: tuple[str, ...] = ()) -> None:
    if not isinstance(values, dict):
        raise CheckpointError(f"{where}: expected an object, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    # init-only fields too: a checkpoint may spell a setting by its accepted old name
    known = set(cls.__dataclass_fields__)
    for key, value in values.items():
        if key in skip:
            continue
        if key not in known:
            raise CheckpointError(f"{where}.{key}: unknown key (known: {', '.join(sorted(known))})")
        hint = hints[key].type if isinstance(hints[key], dataclasses.InitVar) else hints[key]
        if not _matches(value, hint):
            raise CheckpointError(f"{where}.{key}: {value!r} is not a valid {_type_name(hint)}")


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def check_config(config: dict, config_path: str) -> None:
    """Every field of a parsed `codi_config.json` has its dataclass's type, and the method is known."""
    integers = ("format_version", "vocab_rows", "base_vocab_rows")
    for key in integers:
        value = config.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{config_path}: {key}: {value!r} is not a valid int")
    ids = config.get("special_token_ids")
    if ids is not None:
        if not isinstance(ids, dict) or set(ids) != {"pad", "bot", "eot"}:
            raise CheckpointError(
                f"{config_path}: special_token_ids: expected {{pad, bot, eot}}, got {ids!r}"
            )
        bad = [name for name, value in ids.items() if not _matches(value, int)]
        if bad:
            raise CheckpointError(f"{config_path}: special_token_ids.{bad[0]}: {ids[bad[0]]!r} is not an int")
    if "model_args" in config:
        _check_fields(config["model_args"], CODIModelArguments, f"{config_path}: model_args", _CALLER_KEYS)
    objective = config.get("objective") or {}
    if not isinstance(objective, dict):
        raise CheckpointError(f"{config_path}: objective: expected an object, got {objective!r}")
    method = objective.get("method", "codi")
    if method not in METHODS:
        raise CheckpointError(
            f"{config_path}: objective.method: unknown method {method!r} (known: {', '.join(METHODS)})"
        )
    _check_fields(objective.get("loss", {}), LossSettings, f"{config_path}: objective.loss")
    fingerprint = config.get("base_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise CheckpointError(f"{config_path}: base_fingerprint: {fingerprint!r} is not a string")


# --------------------------------------------------------------------------------------------------
# Tokenizer and adapter files


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: truncated or corrupt JSON ({error})") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_settings(path: str, cls, key: str = "settings"):
    """`cls(**value[key])` for the JSON file `path` (a settings file beside `codi_config.json`), each
    field checked against `cls`'s types first: one line naming the file for anything else."""
    saved = _read_json(path)
    if key not in saved:
        raise CheckpointError(f"{path}: missing key {key!r}")
    _check_fields(saved[key], cls, f"{path}: {key}")
    try:
        return cls(**saved[key])
    except (TypeError, ValueError) as error:  # the dataclass's own checks (ranges, combinations)
        raise CheckpointError(f"{path}: {key}: {error}") from error


def _model_default(name: str):
    """A `CODIModelArguments` field's default: what a `codi_config.json` without that key was trained with."""
    return CODIModelArguments.__dataclass_fields__[name].default


def check_files(path: str, config: dict) -> None:
    """Before anything is built from a checkpoint folder (the one place that checks its files): the
    weight files its config says it has are there, the tokenizer files exist and parse, and a LoRA
    checkpoint's `adapter_config.json` parses and agrees with the rank, alpha and targets in
    `codi_config.json` (the adapter is rebuilt from the latter)."""
    args = config.get("model_args", {})
    use_lora = args.get("use_lora", _model_default("use_lora"))
    # one file, or shards listed by an index
    weights = (
        ("adapter_model.safetensors",) if use_lora else ("model.safetensors", "model.safetensors.index.json")
    )
    if not any(os.path.isfile(os.path.join(path, name)) for name in weights):
        raise CheckpointError(f"{path}: {weights[0]} not found (incomplete checkpoint?)")
    if not os.path.isfile(os.path.join(path, EXTRA_WEIGHTS_NAME)):
        raise CheckpointError(
            f"{os.path.join(path, EXTRA_WEIGHTS_NAME)}: file not found (incomplete checkpoint?)"
        )
    if not any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        raise CheckpointError(
            f"{path}: no tokenizer files ({' / '.join(_TOKENIZER_FILES[:2])}): incomplete checkpoint"
        )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if os.path.isfile(os.path.join(path, name)):
            _read_json(os.path.join(path, name))
    if not use_lora:
        return
    adapter_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(adapter_path):
        raise CheckpointError(f"{adapter_path}: file not found (incomplete LoRA checkpoint?)")
    adapter = _read_json(adapter_path)
    expected = {key: args.get(name, _model_default(name)) for key, name in _ADAPTER_KEYS.items()}
    if args.get("lora_target_modules"):
        expected["target_modules"] = sorted(args["lora_target_modules"])
    found = dict(adapter)
    if isinstance(found.get("target_modules"), list):
        found["target_modules"] = sorted(found["target_modules"])
    differ = [
        f"{key} {found.get(key)!r} != {value!r}" for key, value in expected.items() if found.get(key) != value
    ]
    if adapter.get("peft_type", "LORA") != "LORA":
        differ.insert(0, f"peft_type {adapter.get('peft_type')!r} is not 'LORA'")
    if differ:
        raise CheckpointError(
            f"{adapter_path}: does not agree with codi_config.json's model_args: {'; '.join(differ)}"
        )


# --------------------------------------------------------------------------------------------------
# Tensor names


def _names_in(path: str) -> set[str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return set(handle.keys())
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({error})") from error


def _full_weight_names(path: str) -> tuple[set[str], str, list[str]]:
    """(tensor names the full-weight files hold, the file named in messages, shard files missing)."""
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return _names_in(single), single, []
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.isfile(index):
        raise CheckpointError(f"{path}: neither model.safetensors nor its index: incomplete checkpoint")
    shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
    names, absent = set(), []
    for shard in shards:
        if os.path.isfile(os.path.join(path, shard)):
            names |= _names_in(os.path.join(path, shard))
        else:
            absent.append(shard)
    return names, index, absent


def _listed(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _compare(
    where: str, present: set[str], expected: set[str], optional: set[str] = frozenset()
) -> list[str]:
    missing, unexpected = expected - present - optional, present - expected
    problems = []
    if missing:
        problems.append(f"{where} lacks {len(missing)} tensor(s): {_listed(missing)}")
    if unexpected:
        problems.append(
            f"{where} holds {len(unexpected)} tensor(s) this model does not have: {_listed(unexpected)}"
        )
    return problems


def check_weights(model, path: str, config: dict, allow_incomplete: bool = False) -> None:
    """Every tensor the model needs is in the checkpoint's files and nothing else is; an error naming
    the tensors unless `allow_incomplete` (then a warning). Also warns when a LoRA checkpoint has no
    base fingerprint to check its base against."""
    problems = []
    if model.is_lora:
        from peft import get_peft_model_state_dict

        adapter = os.path.join(path, "adapter_model.safetensors")
        expected = set(get_peft_model_state_dict(model.lm, save_embedding_layers=False))
        problems += _compare(adapter, _names_in(adapter), expected)
        if not config.get("base_fingerprint"):
            logger.warning(
                "%s: this LoRA checkpoint records no base fingerprint (written before it was recorded): "
                "nothing checks that %r is the base it was trained on",
                path,
                model.args.model_name_or_path,
            )
    else:
        present, where, absent = _full_weight_names(path)
        if absent:
            problems.append(f"{where} names shard file(s) not in the folder: {', '.join(absent)}")
        tied = set(getattr(model.hf_model, "_tied_weights_keys", None) or ())
        problems += _compare(where, present, set(model.hf_model.state_dict()), optional=tied)
    extra = os.path.join(path, EXTRA_WEIGHTS_NAME)
    problems += _compare(extra, _names_in(extra), set(model._extra_state()))
    if not problems:
        return
    message = f"{path}: incomplete or mismatched weights: {'; '.join(problems)}"
    if allow_incomplete:
        logger.warning("%s (loaded anyway: allow_incomplete_weights)", message)
        return
    raise CheckpointError(
        f"{message}. The missing ones would be left randomly initialised; pass --allow_incomplete_weights "
        "(Python: allow_incomplete_weights=True) to load anyway"
    )


# --------------------------------------------------------------------------------------------------
# Methods


def require_latents(model, command: str) -> None:
    """`command` reads latent thoughts: refuse a checkpoint whose training method has none."""
    method = "coconut" if hasattr(model, "coconut") else model.objective.method
    allowed = LATENT_METHODS.get(command, ("codi",))
    if method not in allowed:
        raise CheckpointError(
            f"codi {command} needs latent thoughts, but this checkpoint was trained with method {method!r}, "
            f"which has none {command} can read (methods it takes: {', '.join(allowed)})"
        )

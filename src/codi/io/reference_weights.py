"""Reading the authors' released checkpoints (docs/method.md#reference-checkpoints): where the weight
files are (local file or folder, sharded index, hub repo), their tensors (safe loading only), the key
variants of the layout, and the settings the weights alone tell (LoRA rank and targets, projection).
`codi.io.convert` maps them into a `CODIModel`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from . import hub

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
LM_PREFIX = "codi."
PRJ_PREFIX = "prj."
# A repository's weight files by format, single or sharded: one format is downloaded, safetensors first
_HUB_WEIGHT_PATTERNS = (
    ["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"],
    ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json"],
)
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")


def resolve_checkpoint_files(path_or_hub_id: str, revision: str | None = None) -> list[str]:
    """Local file, local folder or hub repo -> the weight file(s) (sharded checkpoints via their index)."""
    if os.path.isfile(path_or_hub_id):
        return [path_or_hub_id]
    if os.path.isdir(path_or_hub_id):
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(path_or_hub_id, name)):
                return [os.path.join(path_or_hub_id, name)]
        for name in INDEX_FILES:
            index = os.path.join(path_or_hub_id, name)
            if os.path.isfile(index):
                return [os.path.join(path_or_hub_id, shard) for shard in _index_shards(index)]
        raise FileNotFoundError(
            f"{path_or_hub_id}: no reference checkpoint found (looked for {', '.join(WEIGHT_FILES + INDEX_FILES)})"
        )
    if not hub.is_hub_id(path_or_hub_id, owner=True):
        raise FileNotFoundError(f"{path_or_hub_id}: no such file or folder, and not a hub id (owner/name)")
    return _download(path_or_hub_id, revision)


def _index_shards(index_path: str) -> list[str]:
    with open(index_path) as handle:
        return sorted(set(json.load(handle)["weight_map"].values()))


def _download(repo_id: str, revision: str | None) -> list[str]:
    """The weight files of the hub repository `repo_id` (`hub.download_repo`: from the HF cache alone
    when offline or unreachable): its safetensors when it has them, else its `.bin` files (never both)."""
    for patterns in _HUB_WEIGHT_PATTERNS:
        folder = hub.download_repo(
            repo_id, "reference checkpoint", revision=revision, allow_patterns=patterns
        )
        try:
            return resolve_checkpoint_files(folder)
        except FileNotFoundError:  # this format is not in the repository: try the next
            continue
    raise FileNotFoundError(
        f"{repo_id}: the hub repository holds no reference checkpoint "
        f"(looked for {', '.join(WEIGHT_FILES + INDEX_FILES)})"
    )


def read_state_dict(files: list[str]) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint file(s); `.bin` files are unpickled with `weights_only=True`.
    A file that is truncated, corrupt or holds objects other than tensors: one-line ValueError naming it."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        part = _read_safetensors(path) if path.endswith(".safetensors") else _read_bin(path)
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise ValueError(f"{path}: expected a state dict of tensors, got {type(part).__name__}")
        state.update(part)
    return state


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(f"{path}: truncated or corrupt safetensors file ({_first_line(error)})") from error


def _read_bin(path: str):
    import pickle

    try:
        with warnings.catch_warnings():
            # a plain `pickle.dump` (protocol 4) draws a warning before the refusal below says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message suggests `weights_only=False`, i.e. running whatever the file holds: never
        # relay it (hence `from None`); say what the file is instead.
        detail = _refusal_detail(str(error))
        with open(path, "rb") as handle:
            is_pickle = handle.read(1) == b"\x80"  # the PROTO opcode every pickle since protocol 2 opens with
        if not (detail.startswith("GLOBAL") or (is_pickle and detail.startswith("Unsupported"))):
            raise ValueError(f"{path}: truncated or corrupt PyTorch file ({detail})") from None
        raise ValueError(
            f"{path}: holds objects other than tensors ({detail}), unsafe to unpickle: not loaded. "
            "Use a .safetensors copy of the checkpoint, or re-save its tensors where the source is trusted"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
        raise ValueError(f"{path}: truncated or corrupt PyTorch file ({_first_line(error)})") from error


def _refusal_detail(message: str) -> str:
    """The safe unpickler's reason, e.g. 'GLOBAL argparse.Namespace' or 'Unsupported operand 149'."""
    found = re.search(r"GLOBAL [\w.]+", message)
    if found:
        return found[0]
    reason = message.rpartition("WeightsUnpickler error:")[2].strip().splitlines()
    return reason[0] if reason else "refused by the safe unpickler"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def normalize_reference_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Undo two harmless variants of the layout: a DDP `module.` prefix on every key, and the
    `coconut.` prefix of the authors' earlier checkpoints (their test.py renames it to `codi.`)."""
    notes = []
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
        notes.append("stripped the 'module.' prefix of every key (a DDP-wrapped save)")
    if not any(key.startswith(LM_PREFIX) for key in state) and any(
        key.startswith("coconut.") for key in state
    ):
        state = {
            (LM_PREFIX + key[len("coconut.") :] if key.startswith("coconut.") else key): value
            for key, value in state.items()
        }
        notes.append("renamed the 'coconut.' prefix to 'codi.' (the authors' earlier checkpoint naming)")
    return state, notes


def inspect_reference_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Settings readable from the weights alone: use_lora, lora_r, LoRA targets, projection shape."""
    lm_keys = [key for key in state if key.startswith(LM_PREFIX)]
    if not lm_keys:
        sample = sorted(state)[:5]
        raise ValueError(
            f"not a CODI reference checkpoint: no key starts with {LM_PREFIX!r} (first keys: {sample})"
        )
    info: dict[str, Any] = {}
    lora = {}
    for key in lm_keys:
        match = LORA_KEY.match(key)
        if match:
            lora.setdefault(match["module"], {})[match["which"]] = state[key]
    info["use_lora"] = bool(lora)
    if lora:
        ranks = {parts["A"].shape[0] for parts in lora.values() if "A" in parts}
        if len(ranks) != 1:
            raise ValueError(
                f"LoRA ranks differ between modules ({sorted(ranks)}); per-module ranks are not supported"
            )
        info["lora_r"] = ranks.pop()
        info["lora_target_modules"] = sorted({module.rsplit(".", 1)[-1] for module in lora})
    info["use_prj"] = any(key.startswith(PRJ_PREFIX) for key in state)
    if f"{PRJ_PREFIX}1.weight" in state:
        info["prj_dim"] = state[f"{PRJ_PREFIX}1.weight"].shape[0]
    info["prj_no_ln"] = f"{PRJ_PREFIX}ln.weight" not in state
    return info


@dataclass
class ConversionReport:
    """What the loader did with every tensor of a reference checkpoint."""

    source: list[str]
    base_model: str
    use_lora: bool
    inferred: dict[str, Any] = field(default_factory=dict)
    loaded: int = 0
    unused_keys: list[str] = field(default_factory=list)
    ignored_buffers: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    token_rows: dict[str, list[int]] = field(default_factory=dict)
    unused_rows: list[int] = field(default_factory=list)
    base_mismatch: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [
            f"reference checkpoint {', '.join(self.source)} -> base {self.base_model} "
            f"({'LoRA' if self.use_lora else 'full fine-tuning'})",
            f"  inferred from the weights: {self.inferred}",
            f"  tensors loaded: {self.loaded}",
            "  special-token rows (reference row -> our id): "
            + ", ".join(f"{name} {rows[0]} -> {rows[1]}" for name, rows in self.token_rows.items()),
            f"  unused checkpoint keys ({len(self.unused_keys)}): {self.unused_keys}",
            f"  ignored buffers ({len(self.ignored_buffers)}): {self.ignored_buffers[:4]}"
            + (" ..." if len(self.ignored_buffers) > 4 else ""),
            f"  model keys not in the checkpoint, kept from the base model ({len(self.missing_keys)}): "
            f"{self.missing_keys}",
        ]
        if self.unused_rows:
            lines.append(f"  reference embedding rows not used by this tokenizer: {self.unused_rows}")
        if self.base_mismatch:
            lines.append(
                f"  frozen weights that differ from the base model ({len(self.base_mismatch)}): "
                f"{self.base_mismatch[:5]}" + (" ..." if len(self.base_mismatch) > 5 else "")
            )
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

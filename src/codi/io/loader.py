"""One loader for every checkpoint this package writes: `codi.load(path_or_hub_id)`.

    model = codi.load("runs/gpt2-codi")                  # a folder written by save_pretrained
    model = codi.load("org/codi-gpt2", revision="v1")    # a hub repository (offline: the HF cache)

A checkpoint folder records how it was trained: `codi_config.json` (CODI, CoT-SFT, No-CoT-SFT, iCoT: a
`CODIModel`, whose objective says how it answers) and, for Coconut, `coconut_config.json` (a
`CoconutModel`: its ablations decode differently). `AutoCODIModel.from_pretrained` reads them and
returns the class the checkpoint needs, loaded through that class's `from_pretrained` (the same
options: base model, dtype, `trust_remote_code` from the caller only, fingerprint check, overrides).
"""

from __future__ import annotations

import os

from ..methods.coconut.model import CoconutModel, is_coconut_checkpoint
from ..model import CODIModel
from .checkpoint import HUB_OPTIONS, resolve_checkpoint


def checkpoint_class(folder: str) -> type[CODIModel]:
    """The model class a local checkpoint folder needs."""
    return CoconutModel if is_coconut_checkpoint(folder) else CODIModel


class AutoCODIModel:
    """`AutoCODIModel.from_pretrained(path_or_hub_id, ...)`: the right class for any checkpoint."""

    def __init__(self):
        raise TypeError("AutoCODIModel is not instantiated: use AutoCODIModel.from_pretrained(...)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs) -> CODIModel:
        """Load a checkpoint folder or hub repository as `CODIModel` or `CoconutModel` (see the module
        docstring), with `CODIModel.from_pretrained`'s arguments (the hub's `revision`, `cache_dir`,
        `force_download`, `local_files_only`, `token`; `trust_remote_code`, `allow_base_mismatch`,
        `attn_implementation`, `CODIModelArguments` overrides)."""
        hub_options = {key: kwargs.pop(key) for key in HUB_OPTIONS if key in kwargs}
        folder = resolve_checkpoint(os.fspath(pretrained_model_name_or_path), **hub_options)
        return checkpoint_class(folder).from_pretrained(folder, *args, **kwargs)


def load(pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs) -> CODIModel:
    """`codi.load(path_or_hub_id, base_model_name_or_path=None, dtype=None, **options)`: any checkpoint of
    this package, as the class it needs (`AutoCODIModel.from_pretrained`)."""
    return AutoCODIModel.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

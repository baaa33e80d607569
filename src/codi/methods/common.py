"""What every baseline borrows from the CODI trainer, imported in ONE place.

The training module is `codi.training` (the layout the project is moving to) or, before that rename,
`codi.train`. It is looked up by its full name: `from codi import train` would give the `codi.train()`
convenience function, not the module.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def training_module() -> ModuleType:
    """`codi.training` if it exists, else `codi.train` (CODITrainer, build_model, build_datasets, ...)."""
    for name in ("codi.training", "codi.train"):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:  # the module exists but one of its own imports failed
                raise
    raise ModuleNotFoundError("neither codi.training nor codi.train is importable")

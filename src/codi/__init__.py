"""codi: CODI (continuous chain-of-thought via self-distillation), faithful, fast and tested."""

from ._version import __version__ as __version__

# Imported on first use, so that `import codi.cli` (`codi --help`, `codi --version`) loads no torch.
_LAZY = {
    "CODIConfig": "trainer_inputs",
    "CODITrainer": "training",
    "CoconutConfig": "methods.coconut",
    "CoconutTrainer": "methods.coconut",
    "ICoTConfig": "methods.icot",
    "ICoTTrainer": "methods.icot",
    "CODIDataArguments": "config",
    "CODIModelArguments": "config",
    "CODITrainingArguments": "config",
    "parse_args": "config",
    "CODIModel": "model",
    "AutoCODIModel": "io.loader",
    "load": "io.loader",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def train(*args, **kwargs):
    """`codi.train(model_args, data_args, training_args)`; see `codi.training.train`."""
    from .training import train as _train

    return _train(*args, **kwargs)


__all__ = [
    "AutoCODIModel",
    "CODIConfig",
    "CODITrainer",
    "CoconutConfig",
    "CoconutTrainer",
    "ICoTConfig",
    "ICoTTrainer",
    "CODIDataArguments",
    "CODIModel",
    "CODIModelArguments",
    "CODITrainingArguments",
    "load",
    "parse_args",
    "train",
]

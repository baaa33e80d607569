"""codi: CODI (continuous chain-of-thought via self-distillation), faithful, fast and tested."""

from .config import CODIDataArguments, CODIModelArguments, CODITrainingArguments, parse_args
from .model import CODIModel

__version__ = "0.1.0"


def train(*args, **kwargs):
    """`codi.train(model_args, data_args, training_args)`; see `codi.training.train`."""
    from .training import train as _train

    return _train(*args, **kwargs)


__all__ = [
    "CODIDataArguments",
    "CODIModel",
    "CODIModelArguments",
    "CODITrainingArguments",
    "parse_args",
    "train",
]

"""`codi train`: model, data and training arguments (`codi.config`) -> `train` -> the saved model."""

from __future__ import annotations

from .args import UsageError, unknown_name_error

_UNCHECKED = {"none", "all", "flyte"}  # transformers has no availability check for flyte


def check_reporting(report_to: list[str] | str | None) -> None:
    """Refuse a `--report_to` integration that is unknown or not installed, before any model loads
    (the Trainer would fail only after loading the model, with a traceback)."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    requested = [report_to] if isinstance(report_to, str) else list(report_to or [])
    available = set(get_available_reporting_integrations())
    for name in requested:
        if name not in INTEGRATION_TO_CALLBACK and name not in _UNCHECKED:
            raise unknown_name_error(name, "--report_to", INTEGRATION_TO_CALLBACK)
        if name not in available and name not in _UNCHECKED:
            raise UsageError(
                f"--report_to {name}: {name} is not installed (or not configured): install it, "
                "or pass --report_to none"
            )


def main(argv: list[str]) -> int:
    from ..config import parse_args
    from ..distributed import close_process_group

    model_args, data_args, training_args = parse_args(argv)
    check_reporting(training_args.report_to)
    from ..train import train  # the one place the CLI names the training module

    result = train(model_args, data_args, training_args)
    if result.trainer.is_world_process_zero():
        print({key: value for key, value in result.metrics.items() if isinstance(value, (int, float))})
    close_process_group()
    return 0

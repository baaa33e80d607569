"""`codi train`: model, data and training arguments (`codi.config`) -> `train` -> the saved model."""

from __future__ import annotations

import dataclasses
import logging

from .args import UsageError, read_yaml, split_config, unknown_name_error

logger = logging.getLogger(__name__)

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


def ineffective_settings(model_args, training_args) -> list[str]:
    """Settings that another setting makes ineffective (each is logged as a warning; the run goes on)."""
    import torch

    notes = []
    defaults = {f.name: f.default for f in dataclasses.fields(model_args)}
    lora = [
        name
        for name in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
        if getattr(model_args, name) != defaults[name]
    ]
    if not model_args.use_lora and lora:
        notes.append(f"{', '.join(lora)} ignored: use_lora is False (full fine-tuning)")
    if model_args.fix_attn_mask and not model_args.reference_compat:
        notes.append("fix_attn_mask has no effect without reference_compat")
    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if training_args.fp16 and (training_args.use_cpu or not has_gpu):
        notes.append("fp16 has no effect on the CPU (the run is float32): use --bf16 True for CPU autocast")
    return notes


# Methods with settings of their own: (module, arguments class, training function), imported on use.
METHOD_ARGUMENTS = {
    "icot": ("codi.methods.icot", "ICoTArguments", "train_icot"),
    "coconut": ("codi.methods.coconut", "CoconutArguments", "train_coconut"),
}


def requested_method(argv: list[str]) -> str | None:
    """The `--method` of a command line: the last flag, else the last `--config` YAML that sets it."""
    paths, rest = split_config(argv)
    method = None
    for path in paths:
        method = read_yaml(path).get("method") or method
    for index, token in enumerate(rest):
        if token == "--method" and index + 1 < len(rest):
            method = rest[index + 1]
        elif token.startswith("--method="):
            method = token.split("=", 1)[1]
    return None if method is None else str(method)


def main(argv: list[str]) -> int:
    import importlib

    from ..config import ARGUMENT_CLASSES, parse_args
    from ..distributed import close_process_group

    extra = METHOD_ARGUMENTS.get(requested_method(argv) or "")
    module = importlib.import_module(extra[0]) if extra else None
    classes = ARGUMENT_CLASSES + ((getattr(module, extra[1]),) if extra else ())
    model_args, data_args, training_args, *method_args = parse_args(argv, classes)
    check_reporting(training_args.report_to)
    for note in ineffective_settings(model_args, training_args):
        logger.warning(note)
    from ..training import train

    if extra:
        result = getattr(module, extra[2])(model_args, data_args, training_args, *method_args)
    else:
        result = train(model_args, data_args, training_args)
    if result.trainer.is_world_process_zero():
        print({key: value for key, value in result.metrics.items() if isinstance(value, (int, float))})
        print(f"model saved to {training_args.output_dir}")
    close_process_group()
    return 0

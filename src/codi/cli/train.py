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


# Methods with settings of their own: (module, class-name prefix: XArguments, XConfig, XTrainer).
METHOD_ARGUMENTS = {"icot": ("codi.methods.icot", "ICoT"), "coconut": ("codi.methods.coconut", "Coconut")}


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
    """Flags and presets -> one config (`CODIConfig`, `CoconutConfig` or `ICoTConfig`) -> the method's
    trainer's `run` (the same path as the Python API)."""
    import importlib

    from ..config import ARGUMENT_CLASSES
    from ..distributed import close_process_group
    from ..trainer_inputs import CODIConfig, parse_config

    classes, config_class, trainer_class = ARGUMENT_CLASSES, CODIConfig, None
    extra = METHOD_ARGUMENTS.get(requested_method(argv) or "")
    if extra:
        module = importlib.import_module(extra[0])
        classes += (getattr(module, f"{extra[1]}Arguments"),)
        config_class, trainer_class = (
            getattr(module, f"{extra[1]}Config"),
            getattr(module, f"{extra[1]}Trainer"),
        )
    config = parse_config(argv, config_class, classes)
    check_reporting(config.report_to)
    for note in ineffective_settings(config.model_args(), config):
        logger.warning(note)
    if trainer_class is None:
        from ..training import CODITrainer as trainer_class
    result = trainer_class.run(config)
    if result.trainer.is_world_process_zero():
        print({key: value for key, value in result.metrics.items() if isinstance(value, (int, float))})
        print(f"model saved to {config.output_dir}")
    close_process_group()
    return 0

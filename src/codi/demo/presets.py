"""The demo's presets: everything a `codi demo` run depends on but its seed (docs/demo.md says why these
values), and `--set KEY=VALUE` overrides. `codi.demo.pipeline.harness_settings` turns one into the
settings of the comparison harness (`codi.compare`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..offline_models import ARCHS


@dataclass
class Preset:
    """Everything a demo run depends on (seed excepted)."""

    # data
    steps: int = 3
    operators: str = "+*"
    modulus: int = 10
    wording: str = "uniform"  # every step at the same token position (see synth.question_of)
    invertible: bool = False  # multipliers coprime with the modulus only (see SynthConfig)
    train_min_steps: int = 0  # 0: train on `steps`-step chains only
    n_train: int = 20000
    n_test: int = 500
    n_validation: int = 200
    # model trained from scratch: "gpt2" (learned absolute positions) or "llama" (rotary positions)
    arch: str = "gpt2"
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    # training; both methods get `steps_budget` optimiser steps (CODI's include its CoT warm-up)
    steps_budget: int = 2400
    cot_warmup_steps: int = 400
    batch_size: int = 32
    learning_rate: float = 3e-3
    num_latent: int = 4
    # 0.25, not the paper's GPT-2 value 1: stronger distillation slowed both modes of these small
    # from-scratch models in every regime measured (docs/demo.md)
    distill_factor: float = 0.25
    distill_loss_type: str = "smooth_l1"
    distill_div_std: bool = True
    ref_loss_factor: float = 1.0
    # NOT part of the paper: step supervision of the latents (losses.latent_step_ce); 0 = the paper's
    # objective. Without it the from-scratch student never learned to carry the steps (docs/demo.md).
    latent_step_factor: float = 1.0
    eval_batch_size: int = 250
    parallel: bool = True  # train No-CoT-SFT in a second process while CODI trains
    skip_no_cot: bool = False  # exploration only: the demo's table needs the No-CoT baseline

    def __post_init__(self) -> None:
        """Field values the harness's own checks (`codi.demo.pipeline.check_demo`) do not see."""
        small = [
            f"{name}={getattr(self, name)} (must be >= {least})"
            for names, least in ((_AT_LEAST_ONE, 1), (_AT_LEAST_ZERO, 0))
            for name in names
            if getattr(self, name) < least
        ]
        if small or not self.learning_rate > 0:
            raise ValueError(
                f"preset: {', '.join(small) or f'learning_rate={self.learning_rate} (must be > 0)'}"
            )
        if self.arch not in ARCHS:
            raise ValueError(f"preset field arch must be one of {ARCHS}, got {self.arch!r}")
        if not 0 <= self.cot_warmup_steps < self.steps_budget:  # before any folder is made
            raise ValueError(
                f"cot_warmup_steps ({self.cot_warmup_steps}) must be >= 0 and < steps_budget ({self.steps_budget})"
            )


_AT_LEAST_ONE = ("steps", "n_train", "n_test", "n_layer", "n_embd", "n_head", "steps_budget", "batch_size",
                 "eval_batch_size")  # fmt: skip
_AT_LEAST_ZERO = (
    "n_validation",
    "train_min_steps",
    "distill_factor",
    "ref_loss_factor",
    "latent_step_factor",
)

PRESETS = {
    # Sized to finish in <= 15 min on the shared 2-core machine (see docs/demo.md for the measurements).
    "default": Preset(),
    # The paper's objective alone (no step supervision, distillation factor 1) on the same data,
    # model and budget: the comparison that shows what the step supervision adds.
    "paper": Preset(latent_step_factor=0.0, distill_factor=1.0),
    # The same model and data, 2.5x the steps.
    "long": Preset(steps_budget=6000, cot_warmup_steps=1000),
    "smoke": Preset(
        n_train=400,
        n_test=40,
        n_validation=20,
        n_layer=1,
        n_embd=32,
        n_head=2,
        steps_budget=4,
        cot_warmup_steps=2,
        parallel=False,
    ),
}


def parse_overrides(items: list[str], preset: Preset) -> dict:
    """`--set KEY=VALUE ...` as typed preset fields; a bad key or value names itself."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if key not in Preset.__dataclass_fields__ or not sep:
            raise ValueError(
                f"--set {item!r}: unknown preset field (expected KEY=VALUE, KEY one of "
                f"{sorted(Preset.__dataclass_fields__)})"
            )
        kind = type(getattr(preset, key))
        if kind is bool:
            if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
                raise ValueError(f"--set {item!r}: {key} takes true or false")
            overrides[key] = value.lower() in ("1", "true", "yes")
            continue
        try:
            overrides[key] = kind(value)
        except ValueError:
            article = "an" if kind is int else "a"
            raise ValueError(f"--set {item!r}: {key} takes {article} {kind.__name__}") from None
    return overrides


def synth_config(preset: Preset, seed: int):
    """The synthetic data of a preset: its chains, wording and split sizes, drawn with `seed`."""
    from ..data.synth import SynthConfig

    return SynthConfig(
        n_train=preset.n_train,
        n_validation=preset.n_validation,
        n_test=preset.n_test,
        min_steps=preset.steps,
        max_steps=preset.steps,
        operators=preset.operators,
        modulus=preset.modulus,
        wording=preset.wording,
        invertible=preset.invertible,
        train_min_steps=preset.train_min_steps or None,
        seed=seed,
    )

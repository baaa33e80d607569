"""Decoding options in one frozen object, the next-token rule, and latent-trajectory sampling.

`DecodingConfig` is what `codi.inference.generate.generate` / `generate_samples`, `codi.inference.evaluate.evaluate` and
the probe take instead of loose keyword arguments; its fields carry `help` metadata so a command line
can be built from it. The next token is chosen with transformers' logits processors (suppression,
min-length, temperature, top-k), and our own top-p (see `_top_p`).

Latent sampling (k trajectories per question): Gaussian noise on each latent at
`latent_noise` x that latent's RMS, and/or the model's dropout modules left on while the latents are
made; each (question, sample) pair draws its noise from its own seeded generator.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

MODES = ("latent", "cot")
FAST_DECODING = ("auto", "off", "static", "graphs", "compile")


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class DecodingConfig:
    """How answers are decoded; validated on construction (one-line `ValueError` naming the field)."""

    mode: str = _help("latent: CODI's latent reasoning; cot: teacher-mode explicit CoT.", default="latent")
    num_latent: int | None = _help("Latent thoughts (default: the model's num_latent).", default=None)
    max_new_tokens: int = _help("Answer tokens to generate at most.", default=256)
    min_new_tokens: int = _help("No EOS before this many tokens (benchmarks: fixed lengths).", default=0)
    do_sample: bool = _help("Sample answer tokens instead of greedy decoding.", default=False)
    temperature: float = _help("Sampling temperature (> 0).", default=1.0)
    top_k: int = _help("Sample among the k most likely tokens (0: all).", default=0)
    top_p: float = _help("Nucleus sampling: the smallest set holding this mass, in (0, 1].", default=1.0)
    seed: int | None = _help("Seed of the sampling and latent-noise generators.", default=None)
    feed_answer_prompt: bool = _help(
        "Latent mode: feed <eot> + the answer prompt in one forward (faster; same answers when the model "
        "has learned the prompt).",
        default=False,
    )
    batch_size: int = _help("Rows per forward (each of the k samples of a question is a row).", default=32)
    num_samples: int = _help("Answers per question (k) for pass@k and majority vote.", default=1)
    latent_noise: float = _help(
        "Latent mode: Gaussian noise on each latent, x its RMS (0: none).", default=0.0
    )
    latent_dropout: bool = _help("Latent mode: leave dropout on while the latents are made.", default=False)
    fast_decoding: str = _help(
        "auto: a static KV cache with CUDA-graph steps on CUDA (on CPU: a static cache for LoRA models), "
        "where it reproduces the eager loop; static | graphs | compile (torch.compile, slow to start): "
        "ask for one; off: the eager loop.",
        default="auto",
    )

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"decoding option {message}")

        check(self.mode in MODES, f"mode must be 'latent' or 'cot', got {self.mode!r}")
        check(
            self.num_latent is None or self.num_latent >= 0, f"num_latent must be >= 0, got {self.num_latent}"
        )
        check(
            self.fast_decoding in FAST_DECODING,
            f"fast_decoding must be one of {', '.join(FAST_DECODING)}, got {self.fast_decoding!r}",
        )
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        check(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}",
        )
        check(
            math.isfinite(self.temperature) and self.temperature > 0,
            f"temperature must be > 0, got {self.temperature} (greedy decoding: do_sample=False)",
        )
        check(self.top_k >= 0, f"top_k must be >= 0 (0: no top-k filter), got {self.top_k}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")
        check(
            math.isfinite(self.latent_noise) and self.latent_noise >= 0,
            f"latent_noise must be >= 0, got {self.latent_noise}",
        )
        latent_only = [name for name in ("feed_answer_prompt", "latent_dropout") if getattr(self, name)]
        latent_only += ["latent_noise"] if self.latent_noise else []
        check(
            self.mode == "latent" or not latent_only,
            f"{', '.join(latent_only)} applies to mode='latent' only (CoT samples with do_sample/temperature)",
        )

    @property
    def samples_latents(self) -> bool:
        """Whether the latent trajectories are random (noise or dropout)."""
        return self.mode == "latent" and (self.latent_noise > 0 or self.latent_dropout)

    @property
    def is_sampling(self) -> bool:
        """Whether answers are drawn at random (tokens or latents) or k > 1 answers are asked for."""
        return self.do_sample or self.samples_latents or self.num_samples > 1

    def for_mode(self, mode: str) -> DecodingConfig:
        """This config in `mode`; switching to CoT drops the latent-only settings (`--compare_cot`)."""
        if mode == "cot":
            return replace(self, mode=mode, feed_answer_prompt=False, latent_noise=0.0, latent_dropout=False)
        return replace(self, mode=mode)

    def greedy(self) -> DecodingConfig:
        """One deterministic answer per question with the same lengths and latents."""
        return replace(self, do_sample=False, num_samples=1, latent_noise=0.0, latent_dropout=False)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(item.name for item in fields(cls))


def make_config(config: DecodingConfig | None = None, **options) -> DecodingConfig:
    """`config` (default: `DecodingConfig()`) with `options` replaced; an unknown option names itself."""
    unknown = sorted(set(options) - set(DecodingConfig.field_names()))
    if unknown:
        raise TypeError(f"unknown decoding option(s) {unknown}; valid: {list(DecodingConfig.field_names())}")
    base = config if config is not None else DecodingConfig()
    return replace(base, **options) if options else base


# --------------------------------------------------------------------------------------------------
# The next token


def token_processors(suppress_ids: list[int], min_new_tokens: int, eos_id: int | None, device) -> list:
    """Suppression of never-emitted ids and, before `min_new_tokens`, of EOS (called with the tokens
    generated so far as `input_ids`, so the prompt length to skip is 0). Pass 0 once that many tokens
    are out: the min-length processor clones the logits at every call."""
    processors = [SuppressTokensLogitsProcessor(suppress_ids, device=device)]
    if min_new_tokens > 0 and eos_id is not None:
        processors.append(MinNewTokensLengthLogitsProcessor(0, min_new_tokens, eos_id, device=device))
    return processors


def token_buffers(pad_id: int, batch: int, max_new_tokens: int, forced: list[int], device):
    """The generated tokens (pad-filled, the `forced` ones first) and the per-row finished flags."""
    generated = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    if forced:
        generated[:, : len(forced)] = torch.tensor(forced, device=device)
    return generated, torch.zeros(batch, dtype=torch.bool, device=device)


def apply_processors(processors, input_ids: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """`processors` in order. Not `LogitsProcessorList.__call__`: it inspects every processor's signature
    at every call (~80 us per token on a CPU, for keyword arguments none of these take)."""
    for processor in processors:
        logits = processor(input_ids, logits)
    return logits


@functools.lru_cache(maxsize=32)
def _warpers(temperature: float, top_k: int) -> tuple:
    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k > 0:
        warpers.append(TopKLogitsWarper(int(top_k)))
    return tuple(warpers)


def _top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: drop a token once the mass BEFORE it (descending order) reaches top_p.

    Not `TopPLogitsWarper`: it is the same rule in exact arithmetic, but it sorts ascending, so among
    EQUAL logits at the cut it keeps the other one (measured: ~9 % of rows differ on bf16 logits, 0 on
    float32). Ours keeps the results of earlier versions identical.
    """
    sorted_logits, sorted_index = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = (probs.cumsum(-1) - probs) >= top_p  # the most likely token always stays
    return logits.scatter(-1, sorted_index, sorted_logits.masked_fill(drop, float("-inf")))


def sample_next(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V): argmax, or temperature/top-k/top-p sampling."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = apply_processors(_warpers(float(temperature), int(top_k)), None, logits.float())
    if top_p < 1.0:
        logits = _top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# Latent sampling


def row_seed(seed: int, question_index: int, sample_index: int) -> int:
    """A 63-bit seed for one (question, sample) pair: its noise depends on nothing else (not the batch,
    not k), so sample j of question i is the same in every run with the same seed."""
    mixed = seed
    for value in (question_index, sample_index):
        mixed = (mixed * 0x9E3779B97F4A7C15 + value + 1) % (1 << 63)
    return mixed


def latent_noise(rows: list[tuple[int, int]], seed: int, num_latent: int, hidden: int) -> torch.Tensor:
    """Standard normal noise (B, num_latent, hidden) float32 on the CPU, one generator per row."""
    noise = torch.empty(len(rows), num_latent, hidden)
    for row, (question, sample) in enumerate(rows):
        generator = torch.Generator().manual_seed(row_seed(seed, question, sample))
        noise[row] = torch.randn(num_latent, hidden, generator=generator)
    return noise


def noisy_latents(noise: torch.Tensor, scale: float, then=None):
    """A `latent_transform(step, latent (B, d)) -> (B, d)` adding `scale` x RMS(latent) x noise[:, step]
    (noise (B, num_latent, d)), then applying `then` (an intervention) when given."""

    def transform(step: int, latent: torch.Tensor) -> torch.Tensor:
        rms = latent.float().pow(2).mean(-1, keepdim=True).sqrt()
        noisy = (latent.float() + scale * rms * noise[:, step].to(latent.device)).to(latent.dtype)
        return noisy if then is None else then(step, noisy)

    return transform


@contextlib.contextmanager
def dropout_on(model: nn.Module, seed: int | None, device: torch.device | str = "cpu"):
    """Every `nn.Dropout` of `model` in training mode (nothing else: attention dropout that reads the
    attention module's own flag stays off), the RNG of `device` seeded with `seed` inside and restored
    after; the modules' modes are restored too."""
    device = torch.device(device)
    modules = [module for module in model.modules() if isinstance(module, nn.Dropout)]
    modes = [module.training for module in modules]
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        for module in modules:
            module.train()
        try:
            yield
        finally:
            for module, mode in zip(modules, modes):
                module.train(mode)

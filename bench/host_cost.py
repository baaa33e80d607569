"""Host cost of a piece of work: ATen ops dispatched, kernel/graph launches, CPU vs wall time, syncs.

A step whose CPU time equals its wall time and whose FLOPs are a few ms of GPU is host-bound: its
speed is set by how many operations Python and the dispatcher issue, not by their size. These
counters measure that, on any device:

- `count_aten_ops(fn)`: ATen operations dispatched by `fn()` (a `TorchDispatchMode`, i.e. what
  reaches the kernels, below autograd; forward and backward both count). Eager code only: a
  `torch.compile`d function runs eager under a dispatch mode, so for compiled code use
  `count_launches`.
- `count_launches(fn, device)`: from `torch.profiler`: on CUDA the kernel launches
  (`cudaLaunchKernel`-like runtime calls) and CUDA-graph launches, plus the host-device syncs
  (`cudaStreamSynchronize`, `cudaDeviceSynchronize`, `cudaEventSynchronize`, blocking `cudaMemcpy`);
  on CPU the operations actually run: top-level ATen ops (an op called inside another is part of its
  caller) plus compiled-graph kernels (inductor's C++ kernels when `cpp.enable_kernel_profile` is on,
  which `enable_compiled_kernel_profile()` sets before compiling).
- `cpu_wall(fn, device)`: process CPU seconds and wall seconds of `fn()` (synchronised on CUDA).

    from host_cost import host_cost
    print(host_cost(lambda: train_step(batch), device="cpu"))

Other benches import this file (`sys.path` holds `bench/`); it imports nothing of them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchCooperativeKernel", "cudaLaunchKernelExC")
GRAPH_EVENTS = ("cudaGraphLaunch",)


class OpCounter(TorchDispatchMode):
    """Counts every ATen op that reaches the dispatcher's kernels while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_aten_ops(fn: Callable[[], Any], top: int = 8) -> dict[str, Any]:
    """ATen ops dispatched by `fn()` (eager), with the `top` most frequent."""
    with OpCounter() as counter:
        fn()
    return {"aten_ops": counter.total, "top_ops": dict(counter.ops.most_common(top))}


def enable_compiled_kernel_profile() -> None:
    """Make inductor's CPU kernels visible to the profiler (set before the first compile)."""
    import torch._inductor.config as inductor_config

    inductor_config.cpp.enable_kernel_profile = True


def _is_aten(name: str) -> bool:
    return name.startswith("aten::")


def _top_level_aten(events) -> int:
    """ATen events with no ATen ancestor: the ops the caller issued, not their internals."""
    count = 0
    for event in events:
        if not _is_aten(event.name):
            continue
        parent = event.cpu_parent
        while parent is not None and not _is_aten(parent.name):
            parent = parent.cpu_parent
        count += parent is None
    return count


def count_launches(fn: Callable[[], Any], device: str | torch.device = "cpu") -> dict[str, Any]:
    """Launches and syncs of `fn()` from the profiler (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if on_cuda:
            torch.cuda.synchronize(device)
    events = prof.events()
    names = Counter(event.name for event in events)
    result: dict[str, Any] = {}
    if on_cuda:
        kernels = sum(names[name] for name in LAUNCH_EVENTS)
        graphs = sum(names[name] for name in GRAPH_EVENTS)
        syncs = sum(names[name] for name in SYNC_EVENTS) + sum(
            count for name, count in names.items() if name in ("cudaMemcpy",)
        )
        result.update(kernel_launches=kernels, graph_launches=graphs, launches=kernels + graphs, syncs=syncs)
        # the final synchronize above is ours, not the step's
        result["syncs"] = max(0, result["syncs"] - 1)
    else:
        compiled = sum(count for name, count in names.items() if name.startswith("cpp_fused"))
        aten = _top_level_aten(events)
        result.update(top_level_aten_ops=aten, compiled_kernels=compiled, launches=aten + compiled)
    return result


def cpu_wall(fn: Callable[[], Any], device: str | torch.device = "cpu") -> dict[str, float]:
    """Process CPU seconds and wall seconds of `fn()` and their ratio."""
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if on_cuda:
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "wall_s": round(wall, 4),
        "cpu_s": round(cpu, 4),
        "cpu_over_wall": round(cpu / max(wall, 1e-9), 3),
    }


def host_cost(
    fn: Callable[[], Any], device: str | torch.device = "cpu", eager_ops: bool = True
) -> dict[str, Any]:
    """All counters for one call each of `fn` (run it once before, to warm up / compile)."""
    result: dict[str, Any] = {}
    if eager_ops:
        result.update(count_aten_ops(fn))
    result.update(count_launches(fn, device))
    result.update(cpu_wall(fn, device))
    return result


if __name__ == "__main__":  # a self-check: a small MLP step
    layer = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 1))

    def step() -> None:
        layer(torch.randn(4, 16)).sum().backward()

    step()
    print(host_cost(step))

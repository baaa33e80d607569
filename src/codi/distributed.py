"""Multi-process helpers for code that does not run inside the HF Trainer (evaluation, probing, the CLI).

Training needs none of this: `codi train` under `torchrun` / `accelerate launch` is distributed by the
HF Trainer (DDP, FSDP, DeepSpeed). Evaluation is a plain loop over items, so it is distributed here:

    from codi import distributed

    distributed.init()                                   # no-op unless launched with WORLD_SIZE > 1
    outputs = distributed.map_sharded(answer_all, items) # every rank answers its shard; results come
                                                         # back in the original order on every rank
    if distributed.is_main_process():
        write(outputs)                                   # metrics and files once
    distributed.finish()

The process group is accelerate's: `init()` creates it through `accelerate.PartialState` (backend,
device and launcher environment handled there), as the HF Trainer does during training.

Sharding is strided (rank r takes items r, r + W, r + 2W, ...): shards differ in size by at most one
item, and a dataset sorted by difficulty or length is spread evenly over the ranks (accelerate's
`split_between_processes` cuts contiguous chunks, which would give the last rank the longest
questions of a sorted set). Results are gathered with `accelerate.utils.gather_object` and put back
in input order by index, so the output is identical to a single-process run whenever the per-item
computation does not depend on which other items share its batch (CODI's generation masks padding
at every step for that reason).

Rank information is read from the process group when it exists, otherwise from the launcher's
environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, set by torchrun and accelerate), so the helpers
also work before `init()` - e.g. to silence logging on the other ranks from the start (building a
`PartialState` for that would create the process group).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Set when `init()` created the process group, so that `finish()` destroys only what we created
# (the HF Trainer / accelerate own the group during training).
_created_group = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 when not distributed)."""
    return dist.get_rank() if is_initialized() else _env_int("RANK", 0)


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_initialized() else _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    """Rank of this process on its node (selects the GPU)."""
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True on global rank 0: the one process that logs at INFO level, writes files and prints results."""
    return rank() == 0


def launched_distributed() -> bool:
    """True when a launcher started several processes (`WORLD_SIZE` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def local_device(use_cpu: bool = False) -> torch.device:
    """This process's device: `cuda:LOCAL_RANK` when CUDA is available (and not `use_cpu`), else CPU."""
    if not use_cpu and torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init(backend: str | None = None, use_cpu: bool = False) -> bool:
    """Create the default process group when launched with several processes; returns whether distributed.

    A no-op in a single process and when a group already exists (e.g. inside the HF Trainer). The
    group is made by `accelerate.PartialState`: NCCL on GPUs, with the current CUDA device set to
    LOCAL_RANK (collectives run on the current device); on CPU gloo, which accelerate chooses only
    when told the run is on the CPU (and then prefers MPI when torch has it: gloo is asked for).
    """
    global _created_group
    if is_initialized():
        return world_size() > 1
    if not launched_distributed() or not dist.is_available():
        return False
    from accelerate import PartialState

    on_cpu = local_device(use_cpu).type == "cpu"
    state = PartialState(cpu=on_cpu, backend=backend or ("gloo" if on_cpu else None))
    _created_group = is_initialized()
    logger.info(
        "process group ready: rank %d of %d (%s, %s)", rank(), world_size(), state.backend, state.device
    )
    return world_size() > 1


# gloo's worker threads free each finished work themselves, after the caller has moved on; when the
# work holds tensors Python knew (an all_gather's inputs and outputs), freeing them needs the GIL.
# Destroying the group joins those threads while holding the GIL, so a worker still waiting for it
# deadlocks the rank (seen with py-spy: main thread in ~ProcessGroupGloo -> thread::join, worker in
# ~AsyncAllgatherWork -> gil_scoped_acquire); left to interpreter teardown instead, the rank aborts
# ("terminate called without an active exception"). A barrier (every rank is done) and a short
# GIL-free pause let the workers finish first.
_WORKER_DRAIN_S = 0.5


def _drain_and_destroy() -> None:
    if world_size() > 1:
        dist.barrier()
    time.sleep(_WORKER_DRAIN_S)
    dist.destroy_process_group()


def finish() -> None:
    """Destroy the process group if `init()` created it (torch warns at exit about one left open)."""
    global _created_group
    if _created_group and is_initialized():
        _drain_and_destroy()
    _created_group = False


def close_process_group() -> None:
    """Destroy whatever process group is open (the Trainer's, made by accelerate) after a successful run.

    Call it on success only: a failed rank must not leave the others waiting in the barrier.
    """
    if is_initialized():
        _drain_and_destroy()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_initialized() and world_size() > 1:
        dist.barrier()


def shard_indices(total: int, shard_rank: int | None = None, shards: int | None = None) -> list[int]:
    """Indices of `range(total)` that rank `shard_rank` of `shards` handles: shard_rank, +shards, ...

    Defaults to this process's rank and the world size. A rank may get no index at all when
    total < shards; it must still take part in the gather.
    """
    shard_rank = rank() if shard_rank is None else shard_rank
    shards = world_size() if shards is None else shards
    if shards < 1 or not 0 <= shard_rank < shards:
        raise ValueError(f"rank {shard_rank} is not in a world of {shards} processes")
    return list(range(shard_rank, total, shards))


def shard(items: Sequence[T]) -> tuple[list[int], list[T]]:
    """(indices, items) of this rank's shard of `items`."""
    indices = shard_indices(len(items))
    return indices, [items[index] for index in indices]


def gather_in_order(local_results: Sequence[R], indices: Sequence[int], total: int) -> list[R]:
    """Gather every rank's (index, result) pairs and return all `total` results in index order.

    Collective: every rank must call it (also with an empty shard). Each rank receives the full
    list, so any rank could compute metrics; by convention only the main process writes them.
    Results travel pickled (`gather_object`, i.e. `all_gather_object`), so they must be picklable: plain Python objects
    or CPU tensors, not CUDA tensors.
    """
    if len(local_results) != len(indices):
        raise ValueError(f"{len(local_results)} results for {len(indices)} indices")
    pairs = list(zip(indices, local_results))
    if is_initialized() and world_size() > 1:
        from accelerate.utils import gather_object

        pairs = gather_object(pairs)  # every rank's pairs, rank 0's first
    ordered: list[R | None] = [None] * total
    seen = [False] * total
    for index, result in pairs:
        if not 0 <= index < total or seen[index]:
            raise RuntimeError(f"gather: index {index} is out of range or came from two ranks")
        ordered[index], seen[index] = result, True
    if not all(seen):
        missing = [index for index, ok in enumerate(seen) if not ok][:5]
        raise RuntimeError(f"gather: no rank returned the results of items {missing} (and maybe more)")
    return ordered  # type: ignore[return-value]


def map_sharded(function: Callable[[list[T]], Sequence[R]], items: Sequence[T]) -> list[R]:
    """`function(shard)` on this rank's shard, then all results in the order of `items` on every rank.

    `function` takes a list of items and returns one result per item (so it can batch them). It is
    not called on an empty shard. In a single process this is simply `list(function(list(items)))`.
    """
    if world_size() <= 1 or not is_initialized():
        return list(function(list(items))) if len(items) else []
    indices, local_items = shard(items)
    local_results = list(function(local_items)) if local_items else []
    if len(local_results) != len(local_items):
        raise ValueError(f"function returned {len(local_results)} results for {len(local_items)} items")
    return gather_in_order(local_results, indices, len(items))


def log_level() -> int:
    """INFO on the main process, WARNING elsewhere: N ranks must not print N copies of every message."""
    return logging.INFO if is_main_process() else logging.WARNING

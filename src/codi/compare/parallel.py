"""Training some of `codi.compare`'s runs in a second process (`compare(parallel=True)`): the methods that
need no warm-up train there, one thread, while the others train in the calling process."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from .methods import METHODS, RunContext


def _train_in_child(contexts: list[RunContext], queue) -> None:
    """Child-process entry: one thread (the parent trains on another core), no progress bar; each run's
    train seconds go back through `queue`. `ctx.method` arrives as its name (a registry entry holds
    lambdas, which do not pickle)."""
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    for ctx in contexts:
        ctx = replace(ctx, method=METHODS[ctx.method], budget=replace(ctx.budget, progress=False))
        start = time.perf_counter()
        ctx.method.train(ctx)
        queue.put((ctx.method.name, time.perf_counter() - start))


def start_aside(contexts: list[RunContext]):
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    payload = [replace(ctx, method=ctx.method.name) for ctx in contexts]
    child = spawn.Process(target=_train_in_child, args=(payload, queue))
    child.start()
    return child, queue


def join_aside(child, queue, contexts: list[RunContext]) -> dict[str, float]:
    """Each run's train seconds, once the child is done; an error when it failed."""
    from queue import Empty

    times = {}
    while len(times) < len(contexts):
        try:
            name, seconds = queue.get(timeout=5)
            times[name] = seconds
        except Empty:
            if not child.is_alive():
                break
    child.join()
    if child.exitcode != 0 or len(times) != len(contexts):
        names = ", ".join(ctx.method.name for ctx in contexts)
        raise RuntimeError(
            f"training {names} in a second process failed (exit code {child.exitcode}); see the log above"
        )
    return times

"""What the `codi` entry point settles before a command runs: torch's CPU threads, and help from a cache.

Threads: torch starts one thread per core, and its threads wait for each other at every operation. On a
machine whose cores are busy with other processes that waiting dominates: small models ran up to 100x
slower than on the idle machine. Before torch is imported, `configure_threads` sets OMP_NUM_THREADS
(which torch reads at import) to the cores this process may use (affinity and cgroup quota), shared
among the processes of a launcher (LOCAL_WORLD_SIZE), less the cores already busy (the 1-minute load
average), at least 1. An OMP_NUM_THREADS the user set is kept as is.

Help: `codi train --help` lists HF TrainingArguments' flags, whose module imports torch (~6 s). The text
is cached per command line, codi source, transformers version, Python version and terminal width, so
only the first `--help` after an install or change pays for it; the cache is under $CODI_CACHE_DIR, else
$XDG_CACHE_HOME/codi, else ~/.cache/codi.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import shutil
import sys
from collections.abc import Callable, Mapping, MutableMapping
from importlib import metadata

logger = logging.getLogger("codi.cli")

HELP_FLAGS = ("-h", "--help")


# --------------------------------------------------------------------------------------------------
# CPU threads


def choose_threads(environ: Mapping[str, str], cpus: int, load: float) -> int | None:
    """torch's CPU threads for one process, or None to keep the user's OMP_NUM_THREADS."""
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None
    try:
        processes = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        processes = 1
    per_process = max(1, cpus // processes)
    idle = cpus - int(load + 0.5)
    return max(1, min(per_process, idle))


def available_cpus() -> int:
    """Cores this process may run on: its affinity, capped by a cgroup v2 CPU quota (containers)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="utf-8") as handle:
            quota, period = handle.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def configure_threads(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """Set OMP_NUM_THREADS by `choose_threads` before torch is imported; the number set, or None when
    the user chose it or torch is already imported (a test or notebook calling `codi.cli.main`)."""
    if "torch" in sys.modules:
        return None
    cpus = available_cpus()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = choose_threads(environ, cpus, load)
    if threads is None:
        return None
    environ["OMP_NUM_THREADS"] = str(threads)
    if threads < cpus:
        logger.info(
            "CPU busy (load %.1f on %d cores): torch uses %d thread(s); set OMP_NUM_THREADS to choose",
            load,
            cpus,
            threads,
        )
    return threads


# --------------------------------------------------------------------------------------------------
# Help cache


def wants_help(argv: list[str]) -> bool:
    configured = any(token == "--config" or token.startswith("--config=") for token in argv)
    return any(token in HELP_FLAGS for token in argv) and not configured


def _cache_dir() -> str:
    if os.environ.get("CODI_CACHE_DIR"):
        return os.environ["CODI_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "codi")


def _source_digest() -> str:
    """Every module of the codi package: flags and their help are declared in several of them."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                digest.update(os.path.relpath(os.path.join(folder, name), root).encode())
                with open(os.path.join(folder, name), "rb") as handle:
                    digest.update(handle.read())
    return digest.hexdigest()


def help_cache_path(command: str, argv: list[str]) -> str:
    try:
        transformers = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        transformers = "none"
    parts = [command, *argv, sys.version, transformers, str(shutil.get_terminal_size().columns)]
    key = hashlib.sha256("\0".join([*parts, _source_digest()]).encode()).hexdigest()[:32]
    return os.path.join(_cache_dir(), "help", f"{key}.txt")


class _Tee(io.TextIOBase):
    """Writes through to `stream` and keeps a copy."""

    def __init__(self, stream):
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def help_from_cache(command: str, argv: list[str], run: Callable[[], int]) -> int:
    """Print the cached help of `codi COMMAND argv`, or run the command and cache the help it prints."""
    path = help_cache_path(command, argv)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            sys.stdout.write(handle.read())
        return 0
    tee = _Tee(sys.stdout)
    try:
        with contextlib.redirect_stdout(tee):
            return run()  # a `--help` that was a flag's value: the command ran
    except SystemExit as done:  # argparse printed the help and exits
        if done.code in (0, None) and tee.copy.getvalue():
            _write_quietly(path, tee.copy.getvalue())
        raise


def _write_quietly(path: str, text: str) -> None:
    """Atomically; a cache that cannot be written only costs speed."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        staging = f"{path}.{os.getpid()}.tmp"
        with open(staging, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(staging, path)
    except OSError:
        pass

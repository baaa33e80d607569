"""bench/host_cost.py, the host-cost counters of the benchmarks: ATen ops, launches, CPU vs wall time."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import host_cost  # noqa: E402


def _step(layer: torch.nn.Module) -> None:
    layer(torch.ones(3, 4)).sum().backward()


def test_counts_aten_ops_of_forward_and_backward():
    layer = torch.nn.Linear(4, 2)
    forward_only = host_cost.count_aten_ops(lambda: layer(torch.ones(3, 4)))
    both = host_cost.count_aten_ops(lambda: _step(layer))
    assert forward_only["aten_ops"] >= 2  # ones + addmm (and a transpose)
    assert both["aten_ops"] > forward_only["aten_ops"] + 2  # the backward's ops count too
    assert "addmm" in forward_only["top_ops"]


def test_launches_count_top_level_ops_and_cpu_wall_is_consistent():
    layer = torch.nn.Linear(4, 2)
    cost = host_cost.host_cost(lambda: _step(layer))
    # linear's internals (t, addmm under aten::linear) are one launch of its caller
    assert 0 < cost["top_level_aten_ops"] <= cost["aten_ops"]
    assert cost["launches"] == cost["top_level_aten_ops"] + cost["compiled_kernels"]
    assert cost["wall_s"] >= 0 and cost["cpu_s"] >= 0 and "cpu_over_wall" in cost

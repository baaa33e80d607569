"""The projections of `codi.layer_stack`: frozen or trained linear layers, with or without a peft LoRA
adapter, run as few matmuls as possible.

Projections that read the same input (q/k/v, gate/up) run as one group: their frozen weights are
concatenated once (while they do not change) and multiplied in one matmul. An adapter
`x @ W^T + b + scaling * dropout(x) @ A^T @ B^T` runs one of two ways, whichever costs fewer
multiply-adds per token (`_merge_pays`):

- low rank for the width (the usual case): `codi.fused_lora`'s node, peft's own ops and dropout draws
  with a hand-written backward, one per projection;
- a rank large for the width (the paper's r128 on a narrow model): through the merged update
  `M = scaling * B @ A` (built at each call, so A and B get their gradients through it):
  `x @ (W + M)^T + b` without dropout, `[x, dropout(x)] @ [W, M]^T + b` with it; a group's updates go
  in one block-diagonal matrix, each with its own mask, drawn (adapter, row, feature) so that on the
  CPU they are the masks peft's calls draw.

Either way the arithmetic is the adapter's; only the rounding differs from peft's.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from transformers.pytorch_utils import Conv1D

from .fused_lora import FusedLoraFunction, autocast_state
from .grouped_lora import GroupedLoraFunction, GroupOperands


@dataclass
class Projection:
    """A linear layer (`nn.Linear` or GPT-2's `Conv1D`) and, when peft wrapped it, its LoRA layer."""

    base: nn.Module
    lora: nn.Module | None  # peft's lora.Linear (or codi's fused subclass)
    adapter_name: str | None

    def weight(self) -> torch.Tensor:
        """(out, in), whatever the storage (Conv1D keeps (in, out))."""
        weight = self.base._parameters["weight"]
        return weight.t() if type(self.base) is Conv1D else weight

    def bias(self) -> torch.Tensor | None:
        return self.base._parameters.get("bias")

    def adapter(self) -> tuple[torch.Tensor, torch.Tensor, float, float] | None:
        """(A, B, scaling, dropout probability) of the active adapter, or None (no adapter, merged into
        the weight, or disabled)."""
        lora = self.lora
        if lora is None or lora._disable_adapters or lora.merged_adapters:
            return None
        name = self.adapter_name
        a = lora.lora_A._modules[name]._parameters["weight"]
        b = lora.lora_B._modules[name]._parameters["weight"]
        dropout = lora.lora_dropout._modules[name]
        p = dropout.p if type(dropout) is nn.Dropout and dropout.training else 0.0
        return a, b, lora.scaling[name], p

    def fused(self, x: torch.Tensor, adapter: tuple, transposed: tuple | None = None) -> torch.Tensor:
        """The adapted projection as `FusedLoraFunction` runs it (codi.fused_lora): peft's ops and
        dropout draws, with a hand-written backward; `transposed`: the weights' transposed views, as
        `FusedLoraFunction` takes them."""
        a, b, scaling, p = adapter
        base = self.base
        if not x.is_contiguous() or base._parameters["weight"].requires_grad:
            return (
                F.linear(x, self.weight(), self.bias())
                + F.linear(F.linear(F.dropout(x, p, True), a), b) * scaling
            )
        autocast = autocast_state(x.device.type)
        weight, bias, conv1d = base._parameters["weight"], self.bias(), type(base) is Conv1D
        return FusedLoraFunction.apply(x, weight, bias, a, b, scaling, p, conv1d, autocast, transposed)


def projection(module: nn.Module) -> Projection | None:
    """The `Projection` of `module`, or None when the stack cannot reproduce it (DoRA and other
    variants, several adapters, a LoRA bias, quantised or other base layers)."""
    from peft.tuners.lora import Linear as LoraLinear

    if type(module) in (nn.Linear, Conv1D):
        return Projection(module, None, None)
    if not isinstance(module, LoraLinear):
        return None
    base = module.base_layer
    names = list(module.lora_A.keys())
    if type(base) not in (nn.Linear, Conv1D) or len(names) != 1 or module.lora_variant:
        return None
    name = names[0]
    if module.lora_A[name].bias is not None or module.lora_B[name].bias is not None:
        return None
    if getattr(module, "use_dora", {}).get(name) or module.active_adapters != [name]:
        return None
    return Projection(base, module, name)


class ProjectionGroup:
    """Projections reading one input, run together: `group(x)` = their outputs concatenated."""

    def __init__(self, projections: tuple[Projection, ...]):
        self.projections = projections
        self._frozen: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None
        self._grouped: tuple[tuple, GroupOperands, list] | None = None
        self._views: tuple[tuple, tuple] | None = None

    def __len__(self) -> int:
        return len(self.projections)

    def base(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stacked weight (out_total, in) and bias; concatenated once while nothing trains them (a
        copy of the group's frozen weights kept beside them: one matmul per call instead of k)."""
        if len(self.projections) == 1:
            return self.projections[0].weight(), self.projections[0].bias()
        weights = [p.weight() for p in self.projections]
        biases = [p.bias() for p in self.projections]
        if any(t is not None and t.requires_grad for t in weights + biases):
            return torch.cat(weights), (None if biases[0] is None else torch.cat(biases))
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in weights + biases if t is not None)
        if self._frozen is None or self._frozen[0] != key:
            with cache_mode():
                bias = None if biases[0] is None else torch.cat(biases)
                self._frozen = (key, torch.cat(weights), bias)
        return self._frozen[1], self._frozen[2]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        adapters = [p.adapter() for p in self.projections]
        weight, bias = self.base()
        if all(a is None for a in adapters):
            return F.linear(x, weight, bias)
        probabilities = {a[3] if a is not None else None for a in adapters}
        if len(probabilities) != 1:  # mixed: some adapted, or different dropouts; one at a time
            return torch.cat([ProjectionGroup((p,))(x) for p in self.projections], dim=-1)
        p = probabilities.pop()
        if not _merge_pays(weight, adapters, p):
            if self._groupable(x, weight, adapters):  # one autograd node for the whole group
                a_matrices, b_matrices = [a[0] for a in adapters], [a[1] for a in adapters]
                operands = self._operands(weight, a_matrices, b_matrices)
                autocast = autocast_state(x.device.type)
                scaling = adapters[0][2]
                return GroupedLoraFunction.apply(
                    x, weight, bias, scaling, p, autocast, operands, *a_matrices, *b_matrices
                )
            if len(adapters) == 1:  # peft's computation in one autograd node
                projection, adapter = self.projections[0], adapters[0]
                return projection.fused(x, adapter, self._transposed(projection, adapter))
            outputs = [
                projection.fused(x, adapter) for projection, adapter in zip(self.projections, adapters)
            ]
            return torch.cat(outputs, dim=-1)
        merged = [torch.mm(b * c, a) for a, b, c, _ in adapters]
        if p == 0.0:  # x @ (W + M)^T
            delta = merged[0] if len(merged) == 1 else torch.cat(merged)
            return F.linear(x, weight + delta.to(weight.dtype), bias)
        # [x, dropout_1(x), ..., dropout_k(x)] @ [W, blockdiag(M_1, ..., M_k)]^T: one mask per adapter,
        # drawn (adapter, row, feature) so that on the CPU they are the masks peft's k calls draw
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        groups = len(merged)
        dropped = F.dropout(flat.expand(groups, -1, -1), p, True)
        inputs = torch.cat([flat, dropped.transpose(0, 1).reshape(flat.shape[0], -1)], dim=1)
        block = merged[0] if groups == 1 else torch.block_diag(*merged)
        out = F.linear(inputs, torch.cat([weight, block.to(weight.dtype)], dim=1), bias)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])

    def _operands(self, weight: torch.Tensor, a_matrices: list, b_matrices: list) -> GroupOperands:
        """The group's `GroupOperands` (copies of the weights), rebuilt when a weight may have changed:
        a write through the tensor bumps its version counter; torch's fused AdamW (the Trainer's
        default here) bumps none, so any torch optimizer step counts (`_optimizer_steps`); and a
        backward through the group since the build marks the copies stale, as any optimizer
        (DeepSpeed's, a hand-written loop) updates after a backward. So they are built once per LM
        forward-backward, not at each of its calls. Not seen: writes through `.data` with no optimizer
        step and no backward in between. The key's memory is kept alive with the copies, so that a
        replaced parameter's new memory cannot take the old address."""
        tensors = (weight, *a_matrices, *b_matrices)
        key = (_optimizer_steps[0], *((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))
        cached = self._grouped
        if cached is None or cached[0] != key or cached[1].stale:
            with cache_mode():
                operands = GroupOperands.build(weight, a_matrices, b_matrices)
            cached = self._grouped = (key, operands, [t.untyped_storage() for t in tensors])
        return cached[1]

    def _transposed(self, projection: Projection, adapter: tuple) -> tuple:
        """(W^T or None for a `Conv1D` weight, A^T, B^T) as `FusedLoraFunction` takes them: views, so
        they follow in-place updates; rebuilt when a parameter's memory changed (the views keep the
        old memory alive, so new memory cannot take its address)."""
        weight, a, b = projection.base._parameters["weight"], adapter[0], adapter[1]
        key = (weight.data_ptr(), a.data_ptr(), b.data_ptr(), weight.dtype, a.dtype, b.dtype)
        cached = self._views
        if cached is None or cached[0] != key:
            with cache_mode():
                weight_t = None if type(projection.base) is Conv1D else weight.t()
                cached = self._views = (key, (weight_t, a.t(), b.t()))
        return cached[1]

    def _groupable(self, x: torch.Tensor, weight: torch.Tensor, adapters: list) -> bool:
        """Several adapters of one rank and scaling on a frozen base: `GroupedLoraFunction`'s case."""
        first = adapters[0]
        return (
            len(adapters) > 1
            and x.is_contiguous()
            and not weight.requires_grad
            and all(a[0].shape[0] == first[0].shape[0] and a[2] == first[2] for a in adapters)
        )


# torch optimizer steps so far, process-wide: the fused AdamW updates parameters in place without
# bumping their version counters, so the stacked copies of `ProjectionGroup._operands` key on this too
_optimizer_steps = [0]


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


register_optimizer_step_post_hook(_count_optimizer_step)


@contextmanager
def cache_mode():
    """Where a tensor kept across calls is built: without autograd, and never as an inference tensor
    (a first call under `torch.inference_mode`, as in generation, must not leave tensors that a later
    training step cannot save for its backward)."""
    with torch.inference_mode(False), torch.no_grad():
        yield


def _merge_pays(weight: torch.Tensor, adapters: list, p: float) -> bool:
    """Whether the merged update costs fewer multiply-adds per token than the low-rank matmuls: it
    trades r * (in + out) per adapter for in * out (and one more input copy per adapter under dropout),
    a win only when the rank is large for the width (small models with a paper-size rank)."""
    out_features, in_features = weight.shape
    low_rank = sum(a.shape[0] * (in_features + b.shape[0]) for a, b, _, _ in adapters)
    copies = len(adapters) if p > 0.0 else 1
    return copies * in_features * out_features <= low_rank

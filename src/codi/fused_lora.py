"""Fused LoRA linear: peft's `lora.Linear` forward and backward in one autograd node.

A peft LoRA projection (frozen base linear + dropout + two low-rank matmuls + scale + add) dispatches
~43 ATen ops forward + backward through autograd's generic graph, against 8 for the frozen linear it
wraps; a CODI step runs ~1,700 of them, and on a GPU a step's time is set by that op count, not by
the arithmetic (docs/speed.md). `FusedLoraFunction` computes the same thing with the backward written
by hand on 2-D views, and `FusedLoraLinear` (a `lora.Linear` whose class is swapped in place after
`get_peft_model`, so parameters, state-dict keys and adapter saving are peft's own) uses it whenever
the layer is in the plain case; anything else (merged or disabled adapters, several or mixed-batch
adapters, DoRA or other variants, a LoRA bias, a trainable base layer, mixed dtypes outside autocast,
a non-contiguous input) goes through peft's `forward` unchanged.

Why it is exact: the forward runs the very ATen ops peft's layer runs, in the same order — the base
`addmm`/`mm` that `F.linear` reaches, the dropout mask drawn by the same RNG call `F.dropout` makes
(`native_dropout` on CUDA-like devices, `empty_like(x).bernoulli_(1 - p)` then `div_(1 - p)` on the
CPU: `at::dropout`'s two paths), the two `mm`, `* scaling`, `+`: outputs are bitwise equal and the RNG
stream is left where peft leaves it. The backward is the chain rule of those ops; it folds a few of
them (`addmm_`, `addcmul_` for a matmul or mask product plus the sum), so its rounding may differ from
autograd's in the last ulps.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

# Devices where `at::dropout` takes the fused `native_dropout` kernel (is_fused_kernel_acceptable).
_FUSED_DROPOUT_DEVICES = ("cuda", "xpu", "lazy", "privateuseone")


def _draw_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(dropped x, what the backward needs, scale) with the RNG calls `F.dropout(x, p, True)` makes."""
    scale = 1.0 / (1.0 - p)
    if x.device.type in _FUSED_DROPOUT_DEVICES and x.numel() > 0:
        dropped, mask = torch.native_dropout(x, p, True)
        return dropped, mask, scale
    noise = torch.empty_like(x).bernoulli_(1 - p)
    noise.div_(1 - p)
    return x * noise, noise, scale


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def backward_under_autocast(ctx, backward, grad_out):
    """`backward(ctx, grad_out)` under the autocast state its forward ran in (`ctx.autocast`, the dtype
    or None, and `ctx.device_type`), so each gradient matmul sees the dtypes autograd would have saved."""
    if ctx.autocast is None:
        return backward(ctx, grad_out)
    with torch.autocast(ctx.device_type, dtype=ctx.autocast):
        return backward(ctx, grad_out)


def autocast_state(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class FusedLoraFunction(torch.autograd.Function):
    """y = base(x) + (dropout(x) @ A^T @ B^T) * scaling, base frozen (no gradient for its weight/bias).

    `conv1d`: the base weight is stored (in, out) as in GPT-2's `Conv1D`, else (out, in) as `nn.Linear`.
    `p`: dropout probability, 0 when the layer has none or is in eval mode. `autocast`: the autocast
    dtype in force (None: off), as `autocast_state` gives it. Under autocast the forward's
    matmuls autocast as peft's do, and the backward runs under the same autocast state, so each
    gradient matmul sees the operand dtypes autograd would have saved.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        weight,
        bias,
        lora_a,
        lora_b,
        scaling: float,
        p: float,
        conv1d: bool,
        autocast,
        transposed=None,
    ):
        # `transposed`: (W^T or None for Conv1D, A^T, B^T), views a caller keeps across calls
        weight_t, a_t, b_t = transposed if transposed is not None else (None, lora_a.t(), lora_b.t())
        flat = x if x.dim() == 2 else x.view(-1, x.shape[-1])
        if conv1d:
            base = torch.addmm(bias, flat, weight) if bias is not None else flat.mm(weight)
        else:
            wt = weight_t if weight_t is not None else weight.t()
            base = torch.addmm(bias, flat, wt) if bias is not None else flat.mm(wt)
        lora_in = _cast(flat, lora_a.dtype)  # peft's `_cast_input_dtype`
        if p > 0.0:  # drawn on the flat view: same numel and memory order, so the same mask
            dropped_flat, mask, scale = _draw_dropout(lora_in, p)
        else:
            dropped_flat, mask, scale = lora_in, None, 1.0
        hidden = dropped_flat.mm(a_t)
        update = hidden.mm(b_t) * scaling
        out = base + update
        ctx.save_for_backward(weight, lora_a, lora_b, dropped_flat, hidden, mask)
        ctx.scaling, ctx.scale, ctx.conv1d = scaling, scale, conv1d
        ctx.device_type, ctx.x_dtype = x.device.type, x.dtype
        ctx.autocast = autocast
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        return backward_under_autocast(ctx, FusedLoraFunction._backward, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        weight, lora_a, lora_b, dropped_flat, hidden, mask = ctx.saved_tensors
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        grad = grad_out if grad_out.dim() == 2 else grad_out.reshape(-1, grad_out.shape[-1])
        grad_scaled = grad * ctx.scaling
        grad_x = grad_a = grad_b = None  # A's and B's come back in the matmul dtype: autograd casts them
        if need_b:
            grad_b = grad_scaled.t().mm(hidden)
        if need_x or need_a:
            grad_hidden = grad_scaled.mm(lora_b)
            if need_a:
                grad_a = grad_hidden.t().mm(dropped_flat)
            if need_x:
                grad_x = _cast(grad.mm(weight.t() if ctx.conv1d else weight), ctx.x_dtype)
                _add_lora_input_grad(ctx, grad_x, grad_hidden, lora_a, mask)
                if grad_out.dim() != 2:
                    grad_x = grad_x.view(grad_out.shape[:-1] + (grad_x.shape[-1],))
        return grad_x, None, None, grad_a, grad_b, None, None, None, None, None


def _add_lora_input_grad(ctx, grad_x, grad_hidden, lora_a, mask) -> None:
    """grad_x += the LoRA branch's gradient wrt x: through A, the dropout mask and peft's input cast."""
    if ctx.autocast is None and ctx.x_dtype == lora_a.dtype:  # one dtype: fold into fewer ops
        if mask is None:
            grad_x.addmm_(grad_hidden, lora_a)
        elif mask.dtype == torch.bool:  # native_dropout's mask
            grad_x.add_(torch.ops.aten.native_dropout_backward(grad_hidden.mm(lora_a), mask, ctx.scale))
        else:  # the CPU path's scaled noise
            grad_x.addcmul_(grad_hidden.mm(lora_a), mask)
        return
    grad_in = _cast(grad_hidden.mm(lora_a), lora_a.dtype)
    if mask is not None and mask.dtype == torch.bool:
        grad_in = torch.ops.aten.native_dropout_backward(grad_in, mask, ctx.scale)
    elif mask is not None:
        grad_in = grad_in * mask
    grad_x.add_(_cast(grad_in, ctx.x_dtype))


class FusedLoraLinear(LoraLinear):
    """peft's `lora.Linear` whose plain case runs as one `FusedLoraFunction` node (module docstring)."""

    def _fused_args(self, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple | None:
        """The Function's arguments when the layer is in the plain case, else None (peft's path).

        Runs on every call, ~1,700 times a step: it reads the modules' `_modules`/`_parameters` dicts
        and peft's plain attributes directly, as `nn.Module.__getattr__` would cost more than the ops
        the fusion saves."""
        if args or kwargs or self._disable_adapters or self.merged_adapters:
            return None
        name = self._active_adapter
        if not isinstance(name, str):
            if len(name) != 1:
                return None
            name = name[0]
        modules = self._modules
        lora_a = modules["lora_A"]._modules.get(name)
        if lora_a is None or name in self.lora_variant:
            return None
        base, lora_b = modules["base_layer"], modules["lora_B"]._modules[name]
        conv1d = type(base) is Conv1D
        if not conv1d and type(base) is not nn.Linear:
            return None
        params_a, params_b, params = lora_a._parameters, lora_b._parameters, base._parameters
        if params_a.get("bias") is not None or params_b.get("bias") is not None:
            return None
        weight, bias, a, b = params["weight"], params.get("bias"), params_a["weight"], params_b["weight"]
        if weight.requires_grad or (bias is not None and bias.requires_grad) or not x.is_contiguous():
            return None
        dtype = x.dtype
        if a.dtype != b.dtype or x.dim() < 2:
            return None
        if dtype != a.dtype and not getattr(self, "cast_input_dtype_enabled", True):
            return None
        autocast = autocast_state(x.device.type)
        if autocast is None and (  # without autocast peft's matmuls need one dtype
            weight.dtype != dtype or a.dtype != dtype or (bias is not None and bias.dtype != dtype)
        ):
            return None
        dropout = modules["lora_dropout"]._modules[name]
        if type(dropout) is nn.Dropout:
            p = dropout.p if dropout.training else 0.0
        elif type(dropout) is nn.Identity:
            p = 0.0
        else:
            return None
        return (x, weight, bias, a, b, self.scaling[name], p, conv1d, autocast)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fused = self._fused_args(x, args, kwargs)
        if fused is None:
            return super().forward(x, *args, **kwargs)
        return FusedLoraFunction.apply(*fused)


def fuse_lora_layers(model: nn.Module, enabled: bool = True) -> int:
    """Switch every peft `lora.Linear` of `model` to `FusedLoraLinear` (`enabled`) or back; the count."""
    source, target = (LoraLinear, FusedLoraLinear) if enabled else (FusedLoraLinear, LoraLinear)
    switched = 0
    for module in model.modules():
        if type(module) is source:
            module.__class__ = target
            switched += 1
    return switched

"""Llama's RMSNorm for `codi.layer_stack` in one autograd node.

transformers' `LlamaRMSNorm` is six ATen ops forward and, through autograd's generic graph, about
eighteen backward; the backward written out is six (three more for the weight's gradient, when the
weight trains). Same function: `weight * (x / sqrt(mean(x^2) + eps))`, computed in float32 and cast
back to the input's dtype before the weight multiplies, as transformers computes it.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.float()
        inverse = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True).add_(eps))
        normed = x32 * inverse
        ctx.save_for_backward(weight, normed, inverse)
        ctx.x_dtype = x.dtype
        return weight * normed.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        weight, normed, inverse = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            scaled = (grad_out * weight).float()
            grad_x = scaled.sub_(normed * (scaled * normed).mean(-1, keepdim=True)).mul_(inverse)
            grad_x = grad_x.to(ctx.x_dtype)
        return grad_x, grad_weight, None


class StackRMSNorm:
    """Calls `RMSNormFunction` with a `LlamaRMSNorm`'s live weight and epsilon."""

    def __init__(self, norm: nn.Module):
        self.norm = norm

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        return RMSNormFunction.apply(x, norm._parameters["weight"], norm.variance_epsilon)


def stack_norm(norm: nn.Module):
    """`norm` itself, or its one-node form when it is transformers' Llama RMSNorm."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return StackRMSNorm(norm) if type(norm) is LlamaRMSNorm else norm

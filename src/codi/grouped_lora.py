"""Grouped LoRA: the adapted projections that read one input (q/k/v, gate/up) in one autograd node.

peft runs each adapted projection on its own: a frozen matmul, a dropout mask, two low-rank matmuls,
a scale and a sum, ~27 ATen ops forward and backward even fused (`codi.fused_lora`). Projections of one
input can share most of that: one matmul on their concatenated frozen weights, one draw of all their
dropout masks, one batched matmul through the stacked A matrices and one through the block-diagonal B
matrix, and in the backward one matmul for every B's gradient and one batched matmul for every A's.
A group of k adapters costs ~40 ops instead of 27 k.

Same function: out_i = x @ W_i^T + b_i + scaling * dropout_i(x) @ A_i^T @ B_i^T, concatenated over i,
with peft's order of roundings (each adapter's A product as its own batch, the update scaled and then
added): on the CPU the outputs are peft's to the last bit in the cases tested. The masks are drawn
(adapter, row, feature) in one `bernoulli_`, which on the CPU is the stream of the k draws peft makes
one after the other. The block-diagonal B does (k - 1) / k of its multiply-adds on zeros: cheap next to
the frozen matmul while the rank is small for the width, which is when the layer stack chooses this
path.
"""

from __future__ import annotations

import torch

from .fused_lora import backward_under_autocast


class GroupedLoraFunction(torch.autograd.Function):
    """`apply(x, weight, bias, scaling, p, autocast, *a_matrices, *b_matrices)`: x (..., in); weight
    (out_total, in) and bias the group's frozen base, concatenated; k adapters of one rank r with A_i
    (r, in) and B_i (out_i, r), one scaling, one dropout probability `p` (0 in eval mode); `autocast`:
    the autocast dtype in force, or None (as `codi.fused_lora.autocast_state` gives it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scaling: float, p: float, autocast, *lora):
        count = len(lora) // 2
        a_matrices, b_matrices = lora[:count], lora[count:]
        flat = x.view(-1, x.shape[-1])
        out = torch.addmm(bias, flat, weight.t()) if bias is not None else flat.mm(weight.t())
        a_stack = torch.cat(a_matrices)  # (k r, in)
        b_block = torch.block_diag(*b_matrices)  # (out_total, k r)
        rank = a_matrices[0].shape[0]
        if p > 0.0:  # as `F.dropout` on the CPU: a 0/1 draw divided by 1 - p, times x
            noise = torch.empty((count, *flat.shape), dtype=flat.dtype, device=flat.device).bernoulli_(1 - p)
            kept = flat * noise.div_(1 - p)  # (k, n, in)
        else:
            noise, kept = None, flat.expand(count, *flat.shape)
        # batched, not one (n, k r) matmul: each adapter's product rounds as its own matmul would
        hidden = torch.bmm(kept, a_stack.view(count, rank, -1).transpose(1, 2))  # (k, n, r)
        hidden = hidden.transpose(0, 1).reshape(flat.shape[0], count * rank)
        # peft's order of roundings: the update scaled, then added (not addmm's fused alpha)
        out = out + hidden.mm(b_block.t()).to(out.dtype) * scaling
        ctx.save_for_backward(weight, a_stack, b_block, kept, hidden, noise)
        ctx.scaling, ctx.count, ctx.rank, ctx.autocast = scaling, count, rank, autocast
        ctx.out_sizes = [b.shape[0] for b in b_matrices]
        ctx.device_type, ctx.x_dtype = x.device.type, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        return backward_under_autocast(ctx, GroupedLoraFunction._backward, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        weight, a_stack, b_block, kept, hidden, noise = ctx.saved_tensors
        count, rank, scale = ctx.count, ctx.rank, ctx.scaling
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        grad_hidden = grad.mm(b_block.to(grad.dtype)).mul_(scale)  # (n, k r)
        grad_b_block = grad.t().mm(hidden.to(grad.dtype)).mul_(scale)  # (out_total, k r): its diagonal
        grad_b, row = [], 0
        for index, size in enumerate(ctx.out_sizes):
            grad_b.append(grad_b_block[row : row + size, index * rank : (index + 1) * rank])
            row += size
        grad_x = grad.mm(weight.to(grad.dtype))
        per_adapter = grad_hidden.view(-1, count, rank).transpose(0, 1)  # (k, n, r)
        grad_a = torch.bmm(per_adapter.transpose(1, 2), kept.to(per_adapter.dtype))  # (k, r, in)
        grad_a = grad_a.reshape(count * rank, -1)
        if noise is None:
            grad_x.addmm_(grad_hidden, a_stack.to(grad_x.dtype))
        else:
            through_a = torch.bmm(per_adapter, a_stack.view(count, rank, -1).to(per_adapter.dtype))
            grad_x.add_((through_a * noise).sum(0).to(grad_x.dtype))
        grad_x = grad_x.to(ctx.x_dtype).view(*grad_out.shape[:-1], grad_x.shape[-1])
        return (grad_x, None, None, None, None, None, *grad_a.split(rank), *grad_b)

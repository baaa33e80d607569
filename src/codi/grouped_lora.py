"""Grouped LoRA: the adapted projections that read one input (q/k/v, gate/up) in one autograd node.

peft runs each adapted projection on its own: a frozen matmul, a dropout mask, two low-rank matmuls,
a scale and a sum, ~27 ATen ops forward and backward even fused (`codi.fused_lora`). Projections of one
input can share most of that: one matmul on their concatenated frozen weights, one draw of all their
dropout masks, one batched matmul through the stacked A matrices and one through the B matrices, and
in the backward one batched matmul for every B's gradient and one for every A's. A group of k adapters
costs ~25 ops instead of 27 k.

Same function: out_i = x @ W_i^T + b_i + scaling * dropout_i(x) @ A_i^T @ B_i^T, concatenated over i,
with peft's order of roundings (each adapter's products as their own batch, the update scaled and then
added; backward, the output gradient scaled before it goes through B); what can differ from peft is
how the matmul kernels block their sums (last bits, tests/test_stack_ops.py). The masks are drawn
(adapter, row, feature) in one `bernoulli_`, which on the CPU is the stream of the k draws peft makes
one after the other.

The B matrices go in as one (k, r, out_total) batch, B_i^T in adapter i's columns and zeros elsewhere
(`GroupOperands`): the batched product gives adapter i's update in its columns, exact zeros in the
others, and its sum over the batch is the concatenated update without a copy of the low-rank
activations into another layout. That does (k - 1) / k of the B multiply-adds on zeros: cheap next to
the frozen matmul while the rank is small for the width, which is when the layer stack chooses this
path. The stacked operands are built once per forward-backward (`codi.stack_weights`), not at every
call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fused_lora import backward_under_autocast


@dataclass
class GroupOperands:
    """A group's weights laid out for batched matmuls; no autograd (the parameters' gradients come
    from the node's backward). `weight_t` (in, out_total): the frozen weight transposed; `a_t`
    (k, in, r) and `a` (k, r, in): the A matrices; `b_t` (k, r, out_total) and `b` (k, out_total, r):
    the B matrices zero-padded to the group's output columns; `b_pieces`: sizes splitting the
    (k out_total, r) gradient of the padded B into alternating padding and B_i rows. `stale`: set by
    the backward, after which an optimizer may have changed the weights (`codi.stack_weights`)."""

    weight_t: torch.Tensor
    a_t: torch.Tensor
    a: torch.Tensor
    b_t: torch.Tensor
    b: torch.Tensor
    b_pieces: tuple[int, ...]
    stale: bool = False

    @classmethod
    def build(cls, weight: torch.Tensor, a_matrices, b_matrices) -> GroupOperands:
        """Copies of the weights as they are now (build without autograd)."""
        count, rank = len(a_matrices), a_matrices[0].shape[0]
        a = torch.stack(a_matrices)  # (k, r, in)
        # block i of the block-diagonal of the B_i^T: rows i r .. (i + 1) r, adapter i's columns
        b_t = torch.block_diag(*(b.t() for b in b_matrices)).view(count, rank, -1)
        pieces, row, end = [], 0, 0
        out_total = b_t.shape[-1]
        for index, b in enumerate(b_matrices):
            start = index * out_total + row
            pieces += [start - end, b.shape[0]]
            end, row = start + b.shape[0], row + b.shape[0]
        pieces.append(count * out_total - end)
        return cls(weight.t(), a.transpose(1, 2), a, b_t, b_t.transpose(1, 2), tuple(pieces))


class GroupedLoraFunction(torch.autograd.Function):
    """`apply(x, weight, bias, scaling, p, autocast, operands, *a_matrices, *b_matrices)`: x (..., in);
    weight (out_total, in) and bias the group's frozen base, concatenated; k adapters of one rank r
    with A_i (r, in) and B_i (out_i, r), one scaling, one dropout probability `p` (0 in eval mode);
    `autocast`: the autocast dtype in force, or None (as `codi.fused_lora.autocast_state` gives it);
    `operands`: the `GroupOperands` of these weights (the A and B matrices are passed too, for their
    gradients)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scaling: float, p: float, autocast, operands: GroupOperands, *lora):
        count = len(lora) // 2
        flat = x if x.dim() == 2 else x.view(-1, x.shape[-1])
        out = torch.addmm(bias, flat, operands.weight_t) if bias is not None else flat.mm(operands.weight_t)
        if p > 0.0:  # as `F.dropout` on the CPU: a 0/1 draw divided by 1 - p, times x
            noise = torch.empty((count, *flat.shape), dtype=flat.dtype, device=flat.device).bernoulli_(1 - p)
            kept = flat * noise.div_(1 - p)  # (k, n, in)
        else:
            noise, kept = None, flat.expand(count, *flat.shape)
        # batched, not one (n, k r) matmul: each adapter's product rounds as its own matmul would
        hidden = torch.bmm(kept, operands.a_t)  # (k, n, r)
        # each adapter's update in its own columns, exact zeros in the others: their sum is the concat
        update = torch.bmm(hidden, operands.b_t).sum(0)
        # peft's order of roundings: the update scaled, then added (not addmm's fused alpha)
        out = out + update.to(out.dtype) * scaling
        ctx.save_for_backward(weight, operands.a, operands.b, kept, hidden, noise)
        ctx.scaling, ctx.count, ctx.autocast = scaling, count, autocast
        ctx.operands = operands
        ctx.device_type, ctx.x_dtype = x.device.type, x.dtype
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        return backward_under_autocast(ctx, GroupedLoraFunction._backward, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        weight, a, b, kept, hidden, noise = ctx.saved_tensors
        ctx.operands.stale = True  # the optimizer step that may follow changes the weights
        count, rank = ctx.count, a.shape[1]
        grad = grad_out if grad_out.dim() == 2 else grad_out.reshape(-1, grad_out.shape[-1])
        scaled = grad * ctx.scaling  # autograd's order: the gradient of `update * scaling` first
        batched = scaled.expand(count, *scaled.shape)  # (k, n, out_total), no copy
        grad_hidden = torch.bmm(batched, b.to(scaled.dtype))  # (k, n, r)
        # (k, out_total, r): adapter i's B gradient in its rows of batch i; one split picks them out
        grad_b = torch.bmm(batched.transpose(1, 2), hidden.to(scaled.dtype))
        grad_b = grad_b.view(-1, rank).split(ctx.operands.b_pieces)[1::2]
        grad_a = torch.bmm(grad_hidden.transpose(1, 2), kept.to(grad_hidden.dtype)).unbind(0)  # (r, in) each
        grad_x = grad.mm(weight.to(grad.dtype))
        if noise is None:  # one matmul through every A, added as it is computed
            flat_hidden = grad_hidden.transpose(0, 1).reshape(grad.shape[0], -1)  # (n, k r)
            grad_x.addmm_(flat_hidden, a.view(-1, a.shape[-1]).to(grad_x.dtype))
        else:
            through_a = torch.bmm(grad_hidden, a.to(grad_hidden.dtype))  # (k, n, in)
            grad_x.add_((through_a * noise).sum(0).to(grad_x.dtype))
        grad_x = grad_x.to(ctx.x_dtype)
        if grad_out.dim() != 2:
            grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1])
        return (grad_x, None, None, None, None, None, None, *grad_a, *grad_b)

"""The layer stack's op-saving forms (`codi.layer_stack`, `codi.stack_weights`, `codi.grouped_lora`)
compute what the forms they replaced compute, and keep their ops off the per-layer path.

Each trick against its plain form: the additive mask against the boolean one that attention converts
at every layer; the rotary roll against `rotate_half` as a matmul; the grouped LoRA node on its cached
operands against peft's per-projection computation; the cached operands against every way the weights
change between calls (optimizer steps, in-place writes, writes after a backward); and op counts per
layer call, pinned.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_for
from test_layer_stack import _close, _lm, _three_calls
from torch.utils._python_dispatch import TorchDispatchMode

from codi.grouped_lora import GroupedLoraFunction, GroupOperands
from codi.layer_stack import LayerStack, _additive_mask_dtype, _attention_mask


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _padded_mask():
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0  # left padding: a query row with no allowed key but itself
    mask[1, 7:] = 0
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_additive_mask_is_the_boolean_mask_as_attention_converts_it(dtype):
    allowed = _attention_mask(_padded_mask(), 3, 4, 5, "cpu")
    additive = _attention_mask(_padded_mask(), 3, 4, 5, "cpu", dtype)
    assert allowed.dtype == torch.bool and additive.dtype == dtype
    assert torch.equal(additive, torch.zeros((), dtype=dtype).masked_fill(~allowed, float("-inf")))
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(3, 2, n, 8, generator=generator, dtype=dtype) for n in (5, 9, 9))
    by_bool = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed)
    by_additive = F.scaled_dot_product_attention(query, key, value, attn_mask=additive)
    assert torch.equal(by_bool, by_additive) and torch.isfinite(by_additive).all()


def test_the_mask_dtype_is_the_one_attention_sees():
    x = torch.zeros(2)
    assert _additive_mask_dtype(x) == torch.float32
    assert _additive_mask_dtype(x.double()) == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _additive_mask_dtype(x) == torch.bfloat16  # autocast casts the queries first
        assert _additive_mask_dtype(x.double()) == torch.float64  # and leaves float64 alone
    assert _additive_mask_dtype(torch.zeros(2, device="meta")) is None  # other kernels: boolean


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rotary_roll_is_rotate_half_as_a_matmul_bitwise(dtype):
    """`qk @ R` with R the signed permutation of `rotate_half` (the stack's former form) against
    `roll(qk) * signed_sin`, forward and backward."""
    lm = _lm("llama", None)
    stack = LayerStack.build(lm)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 32, generator=generator, dtype=dtype)
    cos, signed_sin = stack._rope(hidden, torch.arange(5).unsqueeze(0).expand(2, -1))
    head_dim = stack.head_dim
    half = head_dim // 2
    rotation = torch.zeros(head_dim, head_dim, dtype=cos.dtype)
    rotation[half:, :half] = -torch.eye(half, dtype=cos.dtype)
    rotation[:half, half:] = torch.eye(half, dtype=cos.dtype)
    sin = signed_sin * torch.cat([-torch.ones(half), torch.ones(half)]).to(cos.dtype)
    qk = torch.randn(2, 6, 5, head_dim, generator=generator, dtype=dtype, requires_grad=True)
    rolled = torch.addcmul(qk * cos, qk.roll(half, -1), signed_sin)
    (grad_rolled,) = torch.autograd.grad(rolled.square().sum(), qk)
    matmul = torch.addcmul(qk * cos, qk @ rotation.to(dtype), sin)
    (grad_matmul,) = torch.autograd.grad(matmul.square().sum(), qk)
    assert torch.equal(rolled, matmul) and torch.equal(grad_rolled, grad_matmul)


def _group(count_rows: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return (torch.randn(*shape, generator=generator, dtype=dtype) * 0.5).requires_grad_(grad)

    outs = (12, 4, 4)
    x = rand(count_rows, 10, grad=True)
    weight, bias = rand(sum(outs), 10), rand(sum(outs))
    a_matrices = [rand(3, 10, grad=True) for _ in outs]
    b_matrices = [rand(out, 3, grad=True) for out in outs]
    return x, weight, bias, a_matrices, b_matrices


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_grouped_lora_is_peft_per_projection(p):
    """Outputs and every gradient against peft's computation (one dropout draw per adapter, one after
    the other: the same stream), float64."""
    x, weight, bias, a_matrices, b_matrices = _group(7)
    operands = GroupOperands.build(weight, a_matrices, b_matrices)
    torch.manual_seed(3)
    ours = GroupedLoraFunction.apply(x, weight, bias, 0.75, p, None, operands, *a_matrices, *b_matrices)
    grads = torch.autograd.grad(ours.square().sum(), [x, *a_matrices, *b_matrices])
    torch.manual_seed(3)
    pieces, row = [], 0
    for a, b in zip(a_matrices, b_matrices):
        rows = slice(row, row + b.shape[0])
        lora = F.linear(F.linear(F.dropout(x, p, True), a), b) * 0.75
        pieces.append(F.linear(x, weight[rows], bias[rows]) + lora)
        row += b.shape[0]
    theirs = torch.cat(pieces, dim=-1)
    expected = torch.autograd.grad(theirs.square().sum(), [x, *a_matrices, *b_matrices])
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(g.is_contiguous() for g in grads)  # no strided copy when they reach `.grad`


def test_grouped_lora_gradcheck_float64():
    x, weight, bias, a_matrices, b_matrices = _group(4)

    def grouped(x, *lora):
        torch.manual_seed(5)  # one dropout mask for gradcheck's repeated evaluations
        operands = GroupOperands.build(weight, lora[:3], lora[3:])
        return GroupedLoraFunction.apply(x, weight, bias, 0.75, 0.3, None, operands, *lora)

    assert torch.autograd.gradcheck(grouped, (x, *a_matrices, *b_matrices))


def _fresh_outputs(lm, batch):
    """What a stack with nothing cached computes on the weights as they are now."""
    torch.manual_seed(7)
    return LayerStack.build(lm)(**batch).logits


def _update(stack, batch, how: str, optimizer):
    """A training call's backward, then the weights changed `how`."""
    lm = stack.hf_model
    torch.manual_seed(7)
    stack(**batch).logits.square().mean().backward()
    trainable = [p for p in lm.parameters() if p.requires_grad]
    if how == "copy":  # a write through the tensors: it bumps their version counters
        with torch.no_grad():
            for param in trainable:
                param.mul_(0.5)
    elif how == "data":  # after a backward, as an update outside torch's optimizers: no version bump
        for param in trainable:
            param.data.add_(param.grad, alpha=-0.5)
    else:
        with torch.no_grad():  # a call between the backward and the step (a logging callback)
            stack(**batch)
        optimizer.step()
    lm.zero_grad(set_to_none=True)


@pytest.mark.parametrize("how", ["fused_adamw", "foreach_adamw", "copy", "data"])
def test_cached_operands_follow_every_weight_update(how):
    """The torch fused AdamW (the Trainer default here) updates in place without bumping version
    counters: the stack must not reuse copies of the weights from before any kind of update."""
    lm = _lm("llama", 4, 0.0)
    stack = LayerStack.build(lm)
    trainable = [p for p in lm.parameters() if p.requires_grad]
    kind = {"fused": True} if how == "fused_adamw" else {"foreach": True}
    optimizer = torch.optim.AdamW(trainable, lr=0.05, **kind)
    batch = dict(inputs_embeds=torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2)))
    for _ in range(2):
        torch.manual_seed(7)
        before = stack(**batch).logits
        _update(stack, batch, how, optimizer)
        torch.manual_seed(7)
        after = stack(**batch).logits
        assert not torch.equal(after, before)
        assert torch.equal(after, _fresh_outputs(lm, batch))


def test_a_call_under_inference_mode_leaves_nothing_training_cannot_use():
    """Generation runs under `torch.inference_mode`: what the stack caches on such a call must not be
    inference tensors, which a later training step could not save for its backward."""
    lm = _lm("llama", 4, 0.1)
    stack = LayerStack.build(lm)
    mask = torch.ones(2, 5, dtype=torch.long)
    with torch.inference_mode():
        stack(inputs_embeds=torch.randn(2, 5, 32), attention_mask=mask)
    stack(inputs_embeds=torch.randn(2, 5, 32), attention_mask=mask).logits.sum().backward()
    assert all(p.grad is not None for p in lm.parameters() if p.requires_grad)


def test_stack_values_unchanged_after_the_caches_warm_up():
    """The second run of the same calls (every cache built) equals transformers' forward as the first."""
    lm = _lm("llama", 4, 0.1)
    stack = LayerStack.build(lm)
    _three_calls(stack, lm)
    ours, theirs = _three_calls(stack, lm), _three_calls(lm, lm)
    for index, (a, b) in enumerate(zip(ours[0], theirs[0])):
        _close(a, b, f"output {index}")


def _layer_call_ops(lm) -> tuple[list[str], list[str]]:
    """The ops of one masked call continuing a cache, forward and backward, caches warm."""
    stack = LayerStack.build(lm)
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 0] = 0

    def cache():
        with torch.no_grad():
            embeds = torch.randn(2, 4, 32, generator=generator)
            return stack(inputs_embeds=embeds, attention_mask=mask[:, :4]).cache

    def call(past, embeds):
        return stack(inputs_embeds=embeds, attention_mask=mask, cache=past, output_hidden_states=False)

    call(cache(), torch.randn(2, 3, 32, generator=generator)).logits.sum().backward()
    past, embeds = cache(), torch.randn(2, 3, 32, generator=generator)
    with _Ops() as forward:
        out = call(past, embeds)
    with _Ops() as backward:
        out.logits.sum().backward()
    return forward.names, backward.names


def test_per_layer_ops_are_pinned():
    """3 Llama layers with LoRA (dropout on) on all seven projections, plus the head (final norm, LM
    head, sum). Before these forms: 359 forward and 378 backward ops. Lower the pins when a change
    removes ops; raise them only with a reason."""
    forward, backward = _layer_call_ops(_lm("llama", 4, 0.1))
    layers = 3
    assert forward.count("where") == 1  # the mask converted once per call, not at every layer
    assert forward.count("roll") == layers  # rotate_half as one roll, not a 6-op matmul
    assert forward.count("block_diag") == forward.count("stack") == 0  # grouped operands cached
    assert forward.count("t") == 1  # the LM head's only: the projections use cached transposes
    assert forward.count("bmm") == 2 * 2 * layers  # A and B of q/k/v and of gate/up: nothing else
    assert len(forward) <= 249, len(forward)  # 249 on 2026-12-04
    assert len(backward) <= 305, len(backward)  # 305 on 2026-12-04


def test_training_steps_on_the_stack_follow_the_transformers_path(make_model):
    """Three CODI training steps (eight LM calls each, torch's fused AdamW between them) on the stack
    and on transformers' forward, from the same weights with the same dropout draws: the same losses
    at every step, so nothing the stack keeps between calls outlives an update."""
    from dataclasses import replace

    losses = {}
    for stack in (True, False):
        model = make_model("llama", seed=0).train()
        model = model.with_settings(args=replace(model.args, layer_stack=stack))
        assert (model.stack is not None) == stack
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=0.05, fused=True)
        batch = batch_for(model)
        losses[stack] = []
        for step in range(3):
            torch.manual_seed(step)
            loss = model(**batch)["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[stack].append(float(loss.detach()))
    assert losses[True][0] != losses[True][2]  # the updates change the model
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)

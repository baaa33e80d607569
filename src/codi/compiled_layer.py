"""The layer stack's decoder layer as one `torch.compile`d function of tensors (opt-in: `compile_layers`).

On a GPU the eager layer stack still dispatches a few hundred ATen ops per decoder layer per LM call,
each microseconds of host time for less of GPU work (docs/speed.md). Compiled, a layer is a few dozen
kernels and one cached graph call. What makes it compile once, not once per layer or per step:

- the layer is a pure function of tensors (`layer_math`): the hidden states, the past keys/values,
  the mask and rotary tables, and the layer's weights passed as arguments, so the layers of one model
  share one graph (modules passed in would be guarded on identity: one graph per layer);
- everything that is not a tensor (architecture, head counts, epsilons, LoRA scaling and dropout, the
  training flag) is one frozen `LayerSpec`, closed over: dynamo reads it as constants;
- the sizes that vary (batch, call length, cache length) are marked dynamic at each call; a cropped
  cache is made contiguous, the layout every call returns. What does compile apart: a first call with
  no cache against a continued one, one position against several (dynamo specialises sizes 0 and 1),
  training against evaluation, gradients on against off. A CODI step needs three graphs, decoding three
  or four more.

The arithmetic is transformers' (RMSNorm in float32, rotary as the layer stack applies it, one fused
attention call, each LoRA adapter `scaling * B(A(dropout(x)))`, the adapters of one input batched);
the compiler derives the backward. Dropout draws come from the compiler's random stream, so with
dropout on a compiled step is the same distribution, not the same masks, as the eager one; with dropout
off `tests/test_compiled_layer.py` proves it equal to transformers' forward, values and gradients.
"""

from __future__ import annotations

import functools
import itertools
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LayerSpec:
    """A layer's constants, the same for every layer of a model in one mode."""

    arch: str  # "llama" | "gpt2"
    heads: int
    kv_heads: int
    head_dim: int
    norm_eps: float
    attention_scale: float
    attention_dropout: float
    residual_dropout: float  # GPT-2's resid/MLP dropout; 0 for Llama
    activation: str  # "silu" | "gelu_tanh"
    lora: tuple[tuple[float, float] | None, ...]  # per group (qkv, out, up, down): (scaling, dropout p)
    training: bool


_ACTIVATIONS = {"SiLU": "silu", "SiLUActivation": "silu", "NewGELUActivation": "gelu_tanh",
                "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh"}  # fmt: skip


def activation_name(act) -> str | None:
    """The functional form of a layer's activation (a module, or the stack's one-kernel tanh GELU), or
    None (not compiled)."""
    if isinstance(act, functools.partial) and act.func is F.gelu:
        return "gelu_tanh" if act.keywords.get("approximate") == "tanh" else None
    return _ACTIVATIONS.get(type(act).__name__) if isinstance(act, nn.Module) else None


def _activate(name: str, x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) if name == "silu" else F.gelu(x, approximate="tanh")


def _project(x, part, lora, training):
    """x @ W^T + b plus each adapter's `scaling * B(A(dropout(x)))`, outputs concatenated.

    Several adapters of one rank (q/k/v, gate/up) run as two batched matmuls forward, each with its own
    dropout mask, instead of two matmuls each: a compiled layer's launches are mostly these matmuls
    (inductor calls the library's matmul for each). B matrices of different heights (q against k/v) are
    zero-padded to one, which adds multiply-adds on zeros, cheap next to the frozen matmul.
    """
    weight, bias, adapters = part
    out = F.linear(x, weight, bias)
    if not adapters:
        return out
    scaling, p = lora
    if len(adapters) == 1 or len({a.shape for a, _ in adapters}) != 1:
        updates = [F.linear(F.linear(F.dropout(x, p, training), a), b) for a, b in adapters]
        return out + torch.cat(updates, dim=-1) * scaling
    flat = x.reshape(-1, x.shape[-1])
    dropped = F.dropout(flat.expand(len(adapters), *flat.shape), p, training)  # (k, n, in)
    hidden = torch.bmm(dropped, torch.stack([a for a, _ in adapters]).transpose(1, 2))  # (k, n, r)
    heights = [b.shape[0] for _, b in adapters]
    tallest = max(heights)
    b_stack = torch.stack([F.pad(b, (0, 0, 0, tallest - b.shape[0])) for _, b in adapters])  # (k, h, r)
    update = torch.bmm(hidden, b_stack.transpose(1, 2))  # (k, n, h)
    update = torch.cat([update[i, :, :height] for i, height in enumerate(heights)], dim=-1)
    return out + update.view(*x.shape[:-1], -1) * scaling


def _norm(spec: LayerSpec, x, weight, bias):
    if spec.arch == "gpt2":
        return F.layer_norm(x, (x.shape[-1],), weight, bias, spec.norm_eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + spec.norm_eps)
    return weight * x32.to(x.dtype)


def _rotate(x, cos, signed_sin):
    """Rotary positions: `rotate_half(x) * sin` as `roll(x) * signed_sin` (the layer stack's tables)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def layer_math(spec: LayerSpec, hidden, past, mask, rope, weights, is_causal: bool, gqa: bool):
    """One decoder layer: (hidden out, keys, values), keys/values (B, kv_heads, P + T, head_dim)
    including `past`. `weights`: (norm_1, norm_2, qkv, out, up, down), each norm (weight, bias) and
    each projection group (weight, bias, ((A, B), ...)); `rope`: the layer stack's (cos, signed sin),
    (B, 1, T, head_dim) each, or None."""
    batch, length, _ = hidden.shape
    heads, kv_heads, head_dim = spec.heads, spec.kv_heads, spec.head_dim
    norm_1, norm_2, qkv_part, out_part, up_part, down_part = weights
    train = spec.training
    qkv = _project(_norm(spec, hidden, *norm_1), qkv_part, spec.lora[0], train)
    qkv = qkv.view(batch, length, heads + 2 * kv_heads, head_dim).transpose(1, 2)
    query, key, value = qkv.split([heads, kv_heads, kv_heads], dim=1)
    if rope is not None:
        query, key = _rotate(query, *rope), _rotate(key, *rope)
    if past is not None:
        key = torch.cat([past[0], key], dim=2)
        value = torch.cat([past[1], value], dim=2)
    else:  # as a continued call's: the next call's graph sees the cache with the same strides
        key, value = key.contiguous(), value.contiguous()
    attend_key, attend_value = key, value
    if kv_heads != heads and not gqa:
        attend_key = key.repeat_interleave(heads // kv_heads, dim=1)
        attend_value = value.repeat_interleave(heads // kv_heads, dim=1)
    attended = F.scaled_dot_product_attention(
        query,
        attend_key,
        attend_value,
        attn_mask=mask,
        dropout_p=spec.attention_dropout if train else 0.0,
        is_causal=is_causal,
        scale=spec.attention_scale,
        enable_gqa=kv_heads != heads and gqa,
    )
    attended = attended.transpose(1, 2).reshape(batch, length, heads * head_dim)
    update = F.dropout(_project(attended, out_part, spec.lora[1], train), spec.residual_dropout, train)
    hidden = hidden + update
    up = _project(_norm(spec, hidden, *norm_2), up_part, spec.lora[2], train)
    if spec.arch == "llama":
        gate, up = up.chunk(2, dim=-1)
        up = _activate(spec.activation, gate) * up
    else:
        up = _activate(spec.activation, up)
    update = F.dropout(_project(up, down_part, spec.lora[3], train), spec.residual_dropout, train)
    return hidden + update, key, value


_IDS = itertools.count()


@functools.cache
def compiled_layer_math(backend: str, spec: LayerSpec, grad: bool, single_row: bool):
    """`layer_math` for one spec compiled with `backend`, gradients on or off, for batches of one row or
    of several (dynamo specialises a size of 1: decoding one question and a batch compile apart); once
    per process (every model of the process with this spec shares the graphs).

    Each compiled function has a code object of its own, because dynamo counts graphs per code object
    against `recompile_limit` (8) and then runs the function eagerly; one (spec, mode) needs at most four.
    """

    def layer(hidden, past, mask, rope, weights, is_causal, gqa):
        return layer_math(spec, hidden, past, mask, rope, weights, is_causal, gqa)

    # a name of its own too: dynamo's record of which sizes changed between compiles is kept by name
    mode = f"{'train' if spec.training else 'eval'}_{'grad' if grad else 'nograd'}_{'row' if single_row else 'rows'}"
    name = f"layer_{spec.arch}_{mode}_{next(_IDS)}"
    code = layer.__code__.replace(co_name=name, co_qualname=name)
    function = types.FunctionType(code, layer.__globals__, name, None, layer.__closure__)
    return torch.compile(function, backend=backend, fullgraph=True)


def layer_inputs(stack, layer) -> tuple[LayerSpec | None, tuple]:
    """The constants of one of `stack`'s layers (a `codi.layer_stack._Layer`) in the model's current mode
    and its weights as `layer_math` takes them (live tensors: training updates them in place); the spec
    is None when the compiled form does not cover the layer (another activation, adapters of one group
    with different scalings or dropouts, a group only partly adapted)."""
    activation = activation_name(layer.act)
    lora, parts = [], []
    for group in (layer.qkv, layer.out, layer.up, layer.down):
        adapters = [projection.adapter() for projection in group.projections]
        parts.append((*group.base(), tuple((a[0], a[1]) for a in adapters if a is not None)))
        constants = {(adapter[2], adapter[3]) if adapter is not None else None for adapter in adapters}
        if len(constants) != 1:
            return None, ()
        lora.append(constants.pop())
    norms = [getattr(norm, "norm", norm) for norm in (layer.norm_1, layer.norm_2)]  # unwrap codi.stack_norm
    weights = (*((norm._parameters["weight"], norm._parameters.get("bias")) for norm in norms), *parts)
    attention = layer.attention
    if stack.arch == "gpt2":
        norm_eps = norms[0].eps
        attention_dropout, residual_dropout = attention.attn_dropout.p, layer.dropouts[0].p
        if layer.dropouts[1].p != residual_dropout or norms[1].eps != norm_eps:
            return None, ()
    else:
        norm_eps = norms[0].variance_epsilon
        attention_dropout, residual_dropout = attention.attention_dropout, 0.0
    if activation is None:
        return None, ()
    spec = LayerSpec(
        stack.arch, stack.heads, stack.kv_heads, stack.head_dim, float(norm_eps), float(attention.scaling),
        float(attention_dropout), float(residual_dropout), activation, tuple(lora), attention.training,
    )  # fmt: skip
    return spec, weights


def compiled_runner(stack, mask, continued: bool, length: int, gqa: bool):
    """A stand-in for `stack._layer` for one LM call, running the compiled function; None when it does
    not cover the stack's layers (they differ, or `layer_inputs` refuses one). `gqa`: whether the
    attention kernel groups key/value heads itself (`codi.layer_stack.gqa_kernel`)."""
    inputs = [layer_inputs(stack, layer) for layer in stack.layers]
    specs = [spec for spec, _ in inputs]
    if any(spec is None or spec != specs[0] for spec in specs):
        return None
    weights = {id(layer): layer_weights for layer, (_, layer_weights) in zip(stack.layers, inputs)}
    grad = torch.is_grad_enabled()
    is_causal = mask is None and not continued and length > 1
    functions = {}

    def run(layer, hidden, past_kv, mask, rope):
        single_row = hidden.shape[0] == 1
        function = functions.get(single_row)
        if function is None:
            function = functions[single_row] = compiled_layer_math(
                stack.compile_backend, specs[0], grad, single_row
            )
        if grad and not hidden.requires_grad:
            # the first layer's input (frozen embeddings) as every other layer's: one graph, not two
            hidden = hidden.detach().requires_grad_()
        if past_kv is not None and not past_kv[0].is_contiguous():
            # a cropped cache (a view of a longer one) in the layout every call returns: one graph
            past_kv = (past_kv[0].contiguous(), past_kv[1].contiguous())
        _dynamic_sizes(hidden, past_kv, mask, rope)
        return function(hidden, past_kv, mask, rope, weights[id(layer)], is_causal, gqa)

    return run


def _dynamic_sizes(hidden, past_kv, mask, rope) -> None:
    """Compile for any batch, call length and cache length (dynamo still specialises sizes 0 and 1)."""
    from torch._dynamo import maybe_mark_dynamic

    marks = [(hidden, (0, 1)), (mask, (0, 2, 3))]
    marks += [(table, (0, 2)) for table in rope or ()]
    marks += [(cached, (0, 2)) for cached in past_kv or ()]
    for tensor, dims in marks:
        if tensor is not None:
            for dim in dims:
                maybe_mark_dynamic(tensor, dim)

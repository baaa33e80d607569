"""The LM's decoder stack as plain tensor code, with the key/value cache passed in and returned.

A CODI step calls the LM eight times (teacher, `<bot>`, the latents, the answer) and each call runs
every decoder layer through transformers' modules, peft's LoRA wrappers and a `DynamicCache`: on a GPU
the step's time is set by the ~100k operations this dispatches, not by the arithmetic (docs/speed.md).
`LayerStack` runs the same computation for GPT-2 and Llama-family models in fewer operations (3-20 %
fewer per step as measured, docs/speed.md) and with less arithmetic where the merged update pays:

- the projections that read one input run as one matmul (q/k/v; Llama's gate/up), on weights
  concatenated once while frozen;
- a LoRA adapter runs as codi's fused LoRA node, or through its merged update `scaling * B @ A` when
  the rank is large for the width (`codi.stack_weights`): the adapter's function, rounding aside, with
  peft's dropout masks on the CPU;
- the rotary embedding is applied to queries and keys together, `rotate_half` as a roll and a sign;
- attention is one `scaled_dot_product_attention` call per layer with a mask built once per call
  (additive where the kernel would convert a boolean one at every layer); the cache is a list of
  per-layer key/value tensors (`StackCache`), so nothing in the layer depends on cache objects or
  layer indices (a compiler sees one layer function, called L times).

It reads the weights from the live modules at every call (training updates them in place) and returns
what transformers returns: logits, hidden states (embeddings, every layer, the last after the final
norm) and the cache. `LayerStack.build` returns None for anything it does not reproduce (other
architectures, cross-attention, DoRA or several adapters, quantised layers), and the caller keeps
transformers' forward; a 4-D mask or a transformers cache also goes to transformers' forward.
`tests/test_layer_stack.py` proves it equal to transformers' forward, values and gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .compiled_layer import compiled_runner
from .stack_norm import stack_norm
from .stack_weights import ProjectionGroup, cache_mode, projection

logger = logging.getLogger(__name__)


@dataclass
class StackCache:
    """Keys and values of every layer, (B, kv_heads, P, head_dim) each: what the next call continues."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def get_seq_length(self, layer: int = 0) -> int:
        return self.keys[layer].shape[2] if self.keys else 0

    def crop(self, max_length: int) -> None:
        """Keep the first `max_length` columns; a negative value drops that many from the end (as
        `DynamicCache.crop`)."""
        length = self.get_seq_length()
        keep = length + max_length if max_length < 0 else min(max_length, length)
        self.keys = [k[:, :, :keep] for k in self.keys]
        self.values = [v[:, :, :keep] for v in self.values]


@dataclass
class StackOutput:
    logits: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None
    cache: StackCache | None


@dataclass
class _Layer:
    """One decoder layer's modules: norms, the projections and what the attention needs."""

    norm_1: Callable[[torch.Tensor], torch.Tensor]
    norm_2: Callable[[torch.Tensor], torch.Tensor]
    qkv: ProjectionGroup  # GPT-2: c_attn; Llama: q, k, v
    out: ProjectionGroup
    up: ProjectionGroup  # GPT-2: c_fc; Llama: gate, up
    down: ProjectionGroup
    act: Callable[[torch.Tensor], torch.Tensor]
    attention: nn.Module
    dropouts: tuple[nn.Module, ...]  # GPT-2's residual dropouts; Llama has none


class LayerStack:
    """`LayerStack.build(hf_model)(inputs_embeds=..., attention_mask=..., ...)`: the module docstring."""

    def __init__(
        self, hf_model: nn.Module, arch: str, layers: list[_Layer], compile_backend: str | None = None
    ):
        self.hf_model, self.arch, self.layers = hf_model, arch, layers
        self.compile_backend = compile_backend  # layers through `codi.compiled_layer` where it covers them
        config = hf_model.config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.body = hf_model.get_decoder() if arch == "llama" else hf_model.transformer
        self._signs: dict[tuple, torch.Tensor] = {}
        self.final_norm = stack_norm(self.body.norm) if arch == "llama" else self.body.ln_f
        self._first_layer = self._decoder_layers()[0]
        self._first_layer_type = type(self._first_layer)

    @classmethod
    def build(cls, hf_model: nn.Module, compile_backend: str | None = None) -> LayerStack | None:
        """The stack of a transformers GPT-2 or Llama causal LM (peft LoRA layers included), else None.
        `compile_backend` (e.g. "inductor"): run each layer as one `torch.compile`d function with this
        backend (`codi.compiled_layer`); None: eager."""
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block, GPT2LMHeadModel
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaForCausalLM

        try:
            if type(hf_model) is GPT2LMHeadModel:
                blocks = hf_model.transformer.h
                config = hf_model.config
                if config.add_cross_attention or config.reorder_and_upcast_attn:
                    return None
                if not all(type(block) is GPT2Block for block in blocks):
                    return None
                return cls(hf_model, "gpt2", [_gpt2_layer(block) for block in blocks], compile_backend)
            if type(hf_model) is LlamaForCausalLM:
                layers = hf_model.get_decoder().layers
                if not all(type(layer) is LlamaDecoderLayer for layer in layers):
                    return None
                return cls(hf_model, "llama", [_llama_layer(layer) for layer in layers], compile_backend)
        except _Unsupported:
            return None
        return None

    @property
    def active(self) -> bool:
        """False while something the stack would bypass is on: activation checkpointing; a forward hook
        on the model or its layers (a user's probe, FSDP2 and DeepSpeed ZeRO-3 gathering sharded
        weights), a wrapper working through the layers' own forward (FSDP's wrapper class, accelerate's
        offloading replacing `forward`); or
        adapters in another dtype than the base weights outside autocast (peft casts between them; the
        stack computes in one dtype)."""
        first = self._decoder_layers()[0]
        if first is not self._first_layer or type(first) is not self._first_layer_type:
            return False  # replaced or re-classed since the stack was built (FSDP)
        projection = self.layers[0].qkv.projections[0]
        for module in (self.hf_model, self.body, first, projection.base, projection.lora):
            if module is None:
                continue
            if (
                getattr(module, "gradient_checkpointing", False)
                or getattr(module, "_hf_hook", None) is not None
            ):
                return False
            if _foreign_hooks(module):
                return False
        weight = projection.base._parameters["weight"]
        if type(weight) is not nn.Parameter or hasattr(weight, "ds_id"):  # a DTensor shard, ZeRO-3
            return False
        adapter = projection.adapter()
        if adapter is None or adapter[0].dtype == weight.dtype:
            return True
        return torch.is_autocast_enabled(adapter[0].device.type)

    def _decoder_layers(self) -> nn.ModuleList:
        return self.body.layers if self.arch == "llama" else self.body.h

    # ----------------------------------------------------------------------------------------------

    def __call__(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: StackCache | None = None,
        use_cache: bool = True,
        output_hidden_states: bool = True,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> StackOutput:
        batch, length = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=inputs_embeds.device).unsqueeze(0)
        compiled = self.compile_backend is not None
        # additive saves the eager layers a conversion each; a compiled graph converts a boolean mask
        # itself, in whatever dtype its queries have
        additive = None if compiled else _additive_mask_dtype(inputs_embeds)
        mask = _attention_mask(attention_mask, batch, past, length, inputs_embeds.device, additive)
        hidden = self._embed(inputs_embeds, position_ids)
        rope = self._rope(hidden, position_ids)
        states = [hidden] if output_hidden_states else None
        keys, values = [], []
        run_layer = self._layer
        if compiled:
            gqa = gqa_kernel(inputs_embeds.device.type, mask)
            run_layer = compiled_runner(self, mask, cache is not None, length, gqa) or self._layer
        for index, layer in enumerate(self.layers):
            past_kv = (cache.keys[index], cache.values[index]) if cache is not None else None
            hidden, key, value = run_layer(layer, hidden, past_kv, mask, rope)
            keys.append(key)
            values.append(value)
            if states is not None:
                states.append(hidden)
        hidden = self.final_norm(hidden)
        if states is not None:
            states[-1] = hidden
        logits = self.hf_model.lm_head(_keep(hidden, logits_to_keep))
        return StackOutput(
            logits=logits,
            hidden_states=tuple(states) if states is not None else None,
            cache=StackCache(keys, values) if use_cache else None,
        )

    def _embed(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self.arch == "llama":
            return embeds
        hidden = embeds + self.body.wpe(position_ids).to(embeds.device)
        return self.body.drop(hidden)

    def _rope(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, signed sin), (B, 1, T, head_dim) each to broadcast over heads, or None (GPT-2: learned
        absolute positions). `rotate_half(x) * sin == roll(x, head_dim / 2) * signed_sin` exactly: the
        roll moves each half to the other's place, and the sign (-1 on the first half) is exact in any
        float dtype; one op per layer where the permutation as a matmul dispatched six."""
        if self.arch != "llama":
            return None
        cos, sin = self.body.rotary_emb(hidden, position_ids=position_ids)
        key = (self.head_dim, sin.dtype, sin.device)
        signs = self._signs.get(key)
        if signs is None:
            with cache_mode():
                signs = torch.ones(self.head_dim, dtype=sin.dtype, device=sin.device)
                signs[: self.head_dim // 2] = -1
            self._signs[key] = signs
        return cos.unsqueeze(1), (sin * signs).unsqueeze(1)

    def _layer(self, layer: _Layer, hidden, past_kv, mask, rope):
        """One decoder layer: (hidden out, keys, values), keys/values including the past."""
        shape = hidden.shape
        batch, length, _ = shape
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        # (B T, D) inside: every projection takes and gives 2-D tensors, with no view in or out
        hidden = hidden.reshape(batch * length, shape[-1])
        qkv = layer.qkv(layer.norm_1(hidden))
        # heads first before splitting: one transpose instead of one per part
        qkv = qkv.view(batch, length, heads + 2 * kv_heads, head_dim).transpose(1, 2)
        # split, not slices: one gradient copy backward instead of a zero-filled one per slice
        qk, value = qkv.split([heads + kv_heads, kv_heads], dim=1)
        if rope is not None:
            cos, signed_sin = rope
            qk = torch.addcmul(qk * cos, qk.roll(head_dim // 2, -1), signed_sin)
        query, key = qk.split([heads, kv_heads], dim=1)
        if past_kv is not None:
            key = torch.cat([past_kv[0], key], dim=2)
            value = torch.cat([past_kv[1], value], dim=2)
        attention = layer.attention
        dropout = attention.attn_dropout.p if self.arch == "gpt2" else attention.attention_dropout
        attend_key, attend_value = key, value
        grouped = kv_heads != heads
        if grouped and not gqa_kernel(query.device.type, mask):
            attend_key = key.repeat_interleave(heads // kv_heads, dim=1)
            attend_value = value.repeat_interleave(heads // kv_heads, dim=1)
            grouped = False
        attended = F.scaled_dot_product_attention(
            query,
            attend_key,
            attend_value,
            attn_mask=_mask_for(mask, query),
            dropout_p=dropout if attention.training else 0.0,
            is_causal=mask is None and past_kv is None and length > 1,
            scale=attention.scaling,
            enable_gqa=grouped,
        )
        attended = attended.transpose(1, 2).reshape(batch * length, heads * head_dim)
        update = layer.out(attended)
        if layer.dropouts:
            update = layer.dropouts[0](update)
        hidden = hidden + update
        up = layer.up(layer.norm_2(hidden))
        if len(layer.up) == 2:  # Llama: act(gate) * up
            gate, up = up.chunk(2, dim=-1)
            up = layer.act(gate) * up
        else:
            up = layer.act(up)
        update = layer.down(up)
        if layer.dropouts:
            update = layer.dropouts[1](update)
        return (hidden + update).view(shape), key, value


def build_stack(hf_model: nn.Module, enabled: bool, compile_backend: str = "") -> LayerStack | None:
    """The model's layer stack when `enabled` and it covers the model (else None: transformers' forward),
    its layers compiled with `compile_backend` when given."""
    stack = LayerStack.build(hf_model, compile_backend=compile_backend or None) if enabled else None
    if stack is None and compile_backend:
        why = "layer_stack is off" if not enabled else f"it does not cover {type(hf_model).__name__}"
        logger.warning(
            "compile_layers=%s compiles the layer stack's layers, but %s: transformers' forward runs "
            "uncompiled",
            compile_backend,
            why,
        )
    return stack


class _Unsupported(Exception):
    """A layer the stack does not reproduce: `LayerStack.build` returns None."""


def _gpt2_layer(block) -> _Layer:
    attention, mlp = block.attn, block.mlp
    return _Layer(
        norm_1=block.ln_1,
        norm_2=block.ln_2,
        qkv=_group(attention.c_attn),
        out=_group(attention.c_proj),
        up=_group(mlp.c_fc),
        down=_group(mlp.c_proj),
        act=_fused_activation(mlp.act),
        attention=attention,
        dropouts=(attention.resid_dropout, mlp.dropout),
    )


def _llama_layer(layer) -> _Layer:
    attention, mlp = layer.self_attn, layer.mlp
    return _Layer(
        norm_1=stack_norm(layer.input_layernorm),
        norm_2=stack_norm(layer.post_attention_layernorm),
        qkv=_group(attention.q_proj, attention.k_proj, attention.v_proj),
        out=_group(attention.o_proj),
        up=_group(mlp.gate_proj, mlp.up_proj),
        down=_group(mlp.down_proj),
        act=_fused_activation(mlp.act_fn),
        attention=attention,
        dropouts=(),
    )


def _fused_activation(act: nn.Module):
    """GPT-2's `gelu_new` as torch's one-kernel tanh GELU: the same formula (transformers' own
    `gelu_pytorch_tanh`), one op forward and one backward instead of eight and a dozen, rounding aside."""
    from transformers.activations import NewGELUActivation

    if type(act) is NewGELUActivation:
        return partial(F.gelu, approximate="tanh")
    return act


def _group(*modules: nn.Module) -> ProjectionGroup:
    found = [projection(module) for module in modules]
    if any(p is None for p in found):
        raise _Unsupported(", ".join(type(module).__name__ for module in modules))
    return ProjectionGroup(tuple(found))


# transformers keeps a hook on every decoder layer once it has recorded hidden states (it collects
# them for its own forward only): not a hook the stack bypasses
_TRANSFORMERS_CAPTURE = "transformers.utils.output_capturing"


def _foreign_hooks(module: nn.Module) -> bool:
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return any(getattr(hook, "__module__", None) != _TRANSFORMERS_CAPTURE for hook in hooks)


def gqa_kernel(device_type: str, mask: torch.Tensor | None) -> bool:
    """Whether `scaled_dot_product_attention(enable_gqa=True)` keeps a fused kernel: on the CPU always;
    on CUDA only without a mask (the masked kernel there does not group heads, and the fallback is the
    unfused math path), so masked calls repeat the key/value heads first, as transformers does."""
    return device_type == "cpu" or mask is None


def _attention_mask(
    attention_mask, batch: int, past: int, length: int, device, dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """(B, 1, length, past + length): causal and the keys' padding, boolean, or additive (0 / -inf) in
    `dtype` when given; None: causal, no padding.

    A query whose every key is masked (a padded position) attends to itself, so its row stays finite;
    such positions feed nothing that is kept. The additive form is the one `scaled_dot_product_attention`
    converts a boolean mask to at every call (`_additive_mask_dtype`): built once per call here, not once
    per layer.
    """
    if attention_mask is None:
        if past == 0:
            return None
        attention_mask = torch.ones(batch, past + length, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2:
        raise ValueError("LayerStack takes 2-D attention masks only")
    keys = attention_mask.bool()[:, None, None, :]
    columns = torch.arange(past + length, device=device)
    rows = torch.arange(past, past + length, device=device).unsqueeze(1)
    allowed = keys & (columns <= rows)
    alone = (columns == rows) & ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | alone
    if dtype is None:
        return allowed
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=device), float("-inf"))


def _additive_mask_dtype(queries: torch.Tensor) -> torch.dtype | None:
    """The dtype `scaled_dot_product_attention` converts a boolean mask to (0 where allowed, -inf where
    not) for these queries (autocast casts them first), or None where the mask should stay boolean: on
    CUDA in half precision the cuDNN kernel may run, and it converts with a finite fill value of its own
    (not -inf); other devices have their own kernels. The kernel choice does not depend on the mask's
    dtype, so passing the converted mask changes no result."""
    device, dtype = queries.device.type, queries.dtype
    if device not in ("cpu", "cuda"):
        return None
    if torch.is_autocast_enabled(device) and dtype in (torch.float32, torch.float16, torch.bfloat16):
        dtype = torch.get_autocast_dtype(device)
    if device == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return None
    return dtype


def _mask_for(mask: torch.Tensor | None, query: torch.Tensor) -> torch.Tensor | None:
    """`mask` as this layer's attention takes it: an additive mask must be in the queries' dtype (the
    stack builds it from the embeddings' dtype, which they almost always share)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    dtype = _additive_mask_dtype(query)
    if dtype == mask.dtype:
        return mask
    allowed = mask == 0
    return allowed if dtype is None else mask.to(dtype)


def _keep(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]
    return hidden[:, logits_to_keep]

"""Decoding on a static KV cache, on CUDA with CUDA-graph steps (docs/speed.md#decoding).

The eager loop of `codi.inference.generate` is host-bound on a GPU: each step launches hundreds of small ops
(a growing `DynamicCache`, a fresh 4-D mask built by transformers, a host sync in that mask code),
and the GPU waits for Python. Here every single-position step (each latent thought, `<eot>`, the
answer prompt, each answer or CoT token) has the same shapes:

- keys/values go into a `transformers.StaticCache` of a fixed length (rounded up to `_BUCKET`, so
  batches of a run share one cache and its graphs);
- the attention mask is ours: one additive (B, 1, 1, length) buffer, 0 for the columns a row
  attends (its tokens, latents and generated tokens) and the dtype's minimum elsewhere, written one
  column per step in place; transformers takes a 4-D mask as it is;
- position ids are one (B, 1) buffer advanced in place;
- the all-finished check, the one host sync of the loop, runs every `SYNC_EVERY` tokens.

Only the question's prefill runs eagerly (its length varies). With `graphs` (the CUDA default) each
kind of step (latent: last hidden state; token: logits) is captured once per cache shape as a CUDA graph
and replayed: one launch per position instead of hundreds of ops, at no compile time. With `compile`
the step is `torch.compile(mode="reduce-overhead")` instead (fused kernels; tens of seconds to compile). Results are the
eager loop's up to float rounding (attention over masked extra columns sums in another order); the
tests check identical greedy tokens in float32. The eager loop stays the reference: it is used for
`fast_decoding="off"`, the reference policy, `latent_dropout` and models whose latent loop is not
CODI's own.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections import OrderedDict

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from .decoding import DecodingConfig, apply_processors, token_buffers, token_processors

logger = logging.getLogger(__name__)

SYNC_EVERY = 8  # answer tokens between two all-finished checks (each one a host sync)
_BUCKET = 64  # cache lengths are rounded up to this: batches of other lengths reuse the graph
_KEEP_SESSIONS = 4  # static caches kept per model (each CUDA graph is tied to one)
_MERGE_LIMIT_BYTES = 2 << 30  # merged LoRA weights are a copy: not beyond this much memory
_sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_merged: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # LoRA layer -> (versions, weight)
# A captured CUDA graph reads the weight tensors it saw: sessions are keyed by whether the LoRA layers are
# merged and by the generation of the merged tensors (refreshed in place while their shapes hold).
_merging: set[int] = set()
_generation = [0]


def engine(model, config: DecodingConfig) -> str:
    """The decoding loop for this model and config: "eager", "static", "graphs" or "compile".

    auto: "graphs" on CUDA; on other devices "static" for a LoRA model whose projections merge (the
    merge is what wins there), else "eager"; "eager" wherever the static loop does not reproduce the
    eager one (see the module docstring). "graphs" off CUDA is "static".
    """
    choice = config.fast_decoding
    if choice == "off":
        return "eager"
    why_not = _unsupported(model, config)
    if why_not:
        if choice != "auto":
            logger.info("fast_decoding=%s not used: %s; decoding eagerly", choice, why_not)
        return "eager"
    cuda = model.device.type == "cuda"
    if choice == "auto" and not cuda:  # measured on CPU: a win with merged LoRA only (docs/speed.md)
        return "static" if _plain_lora_layers(model) else "eager"
    if choice == "auto" or (choice == "graphs" and not cuda):
        return "graphs" if cuda else "static"
    return choice


def _unsupported(model, config: DecodingConfig) -> str | None:
    """Why the static loop cannot reproduce the eager one for this model, or None."""
    if model.policy.is_reference:
        return "the reference policy's steps are unmasked"
    if config.mode == "latent" and config.latent_dropout:
        return "latent_dropout"
    own_loop = type(model).encode_latents.__qualname__ == "CODIModel.encode_latents"  # not overridden
    coconut = getattr(model, "coconut", None)
    if config.mode == "latent" and not own_loop and getattr(coconut, "variant", None) != "coconut":
        return "the model feeds its own latents"
    implementation = getattr(model.hf_model.config, "_attn_implementation", None)
    if implementation not in ("sdpa", "eager"):
        return f"attention {implementation!r} takes no 4-D mask"
    return None


class _Session:
    """A static cache, its mask and positions for one (batch, length): reused across batches."""

    def __init__(self, model, batch: int, length: int, kind: str):
        hf_model = model.hf_model
        self.hf_model = hf_model
        device = model.device
        self.dtype = hf_model.get_input_embeddings().weight.dtype
        self.cache = StaticCache(config=hf_model.config, max_cache_len=length)
        if any(type(layer) is not StaticLayer for layer in self.cache.layers):
            raise ValueError("sliding-window layers")  # caught by `session`: decode eagerly
        self.length = length
        self.minimum = torch.finfo(self.dtype).min
        self.mask = torch.full((batch, 1, 1, length), self.minimum, dtype=self.dtype, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.column = 0
        # graphs: captured by hand; compile on CUDA: reduce-overhead, CUDA graphs too
        self.graphs = kind == "graphs" or (kind == "compile" and device.type == "cuda")
        self._hidden_step, self._logits_step = self._hidden, self._logits
        if kind == "graphs":
            pool = torch.cuda.graph_pool_handle()
            self._hidden_step = _CapturedStep(self._hidden, self.cache, pool)
            self._logits_step = _CapturedStep(self._logits, self.cache, pool)
        if kind == "compile":
            torch._dynamo.mark_static_address(self.mask)
            torch._dynamo.mark_static_address(self.position)
            options = dict(mode="reduce-overhead") if self.graphs else {}
            self._hidden_step = torch.compile(self._hidden, dynamic=False, **options)
            self._logits_step = torch.compile(self._logits, dynamic=False, **options)

    def reset(self) -> None:
        self.cache.reset()
        self.mask.fill_(self.minimum)
        self.column = 0

    def _step(self, embeds, mask, position, **outputs):
        return self.hf_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=position, cache=self.cache, use_cache=True,
            **outputs,
        )  # fmt: skip

    def _hidden(self, embeds, mask, position):
        no_logits = torch.empty(0, dtype=torch.long, device=embeds.device)
        out = self._step(embeds, mask, position, output_hidden_states=True, logits_to_keep=no_logits)
        return out.hidden_states[-1][:, -1]

    def _logits(self, embeds, mask, position):
        return self._step(embeds, mask, position, logits_to_keep=1).logits[:, -1]

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, logits: bool) -> torch.Tensor:
        """The left-padded prompt (B, L) from column 0; the last position's logits or last-layer state."""
        batch, width = attention_mask.shape
        keep = attention_mask.bool()
        self.mask[:, 0, 0, :width] = torch.where(keep, 0.0, self.minimum).to(self.dtype)
        causal = torch.ones(width, width, dtype=torch.bool, device=keep.device).tril()
        prompt_mask = torch.full(
            (batch, 1, width, self.length), self.minimum, dtype=self.dtype, device=keep.device
        )
        prompt_mask[:, 0, :, :width] = torch.where(causal & keep[:, None, :], 0.0, self.minimum)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        self.position.copy_(attention_mask.long().sum(-1, keepdim=True))
        self.column = width
        step = self._logits if logits else self._hidden  # varying lengths: never compiled
        return step(embeds, prompt_mask, positions)

    def step(self, embeds: torch.Tensor, input_mask: torch.Tensor, logits: bool) -> torch.Tensor:
        """Feed one position per row (B, 1, d); rows with input_mask 0 are padding: nothing attends to
        them and their position stays. Returns a copy of the logits (B, V) or the last-layer state."""
        if self.column >= self.length:
            raise RuntimeError(f"static cache of {self.length} positions is full")
        keep = input_mask.reshape(-1, 1).bool()
        self.mask[:, 0, 0, self.column : self.column + 1] = torch.where(keep, 0.0, self.minimum)
        self.column += 1
        if self.graphs and not isinstance(self._hidden_step, _CapturedStep):
            torch.compiler.cudagraph_mark_step_begin()
        out = (self._logits_step if logits else self._hidden_step)(embeds, self.mask, self.position)
        self.position.add_(keep.long())
        return out.clone() if self.graphs else out  # graph outputs are overwritten by the next replay


class _CapturedStep:
    """A step function replayed as a CUDA graph captured at its first call: the embeddings are copied
    into a static input; the mask, positions and cache are static already. The capture's warm-up run
    writes the cache column that the real step then overwrites, and its cache length is put back."""

    def __init__(self, function, cache, pool):
        self.function, self.cache, self.pool = function, cache, pool
        self.graph = self.embeds = self.output = None
        self.failed = False

    def __call__(self, embeds, mask, position):
        if self.graph is None and not self.failed:
            self._capture(embeds, mask, position)
        if self.failed:
            return self.function(embeds, mask, position)
        self.embeds.copy_(embeds)
        self.graph.replay()
        return self.output

    def _capture(self, embeds, mask, position) -> None:
        lengths = [layer.cumulative_length.clone() for layer in self.cache.layers]
        self.embeds = embeds.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (workspaces, lazy state)
                self.function(self.embeds, mask, position)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.output = self.function(self.embeds, mask, position)
            self.graph = graph
        except RuntimeError as error:  # e.g. a host sync inside the model: replay is impossible
            logger.warning("CUDA graph capture failed (%s); this shape decodes without graphs", error)
            self.failed = True
        finally:
            for layer, length in zip(self.cache.layers, lengths):
                layer.cumulative_length.copy_(length)


def session(model, batch: int, length: int, kind: str) -> _Session | None:
    """A reset session for this shape (reused: its graphs belong to it), or None when the model's cache
    cannot be static."""
    length = -(-length // _BUCKET) * _BUCKET
    kept = _sessions.setdefault(model.hf_model, OrderedDict())
    merged = _generation[0] if id(model.hf_model) in _merging else None
    key = (batch, length, kind, merged, model.device, model.hf_model.get_input_embeddings().weight.dtype)
    found = kept.pop(key, None)
    if found is None:
        try:
            found = _Session(model, batch, length, kind)
        except ValueError:
            return None
    kept[key] = found
    while len(kept) > (1 if kind == "static" else _KEEP_SESSIONS):
        kept.popitem(last=False)
    found.reset()
    return found


def decode(model, input_ids, attention_mask, config: DecodingConfig, run: dict, kind: str) -> tuple | None:
    """The static loop of `codi.inference.generate._decode_batch`: generated ids (B, steps) and the latents.

    run: num_latent, max_new_tokens, min_new_tokens, forced (answer prompt ids), suppress, sample (the
    next-token rule) and its sampling options, plan (`_LatentPlan`). Returns None when the model's
    cache cannot be static.
    """
    batch = input_ids.shape[0]
    latent = config.mode == "latent"
    num_latent = run["num_latent"] if latent else 0
    extra = (num_latent + 1 + len(run["forced"])) if latent else 0
    state = session(model, batch, input_ids.shape[1] + extra + run["max_new_tokens"], kind)
    if state is None:
        return None
    embeds = model.embed(input_ids)
    latents: list[torch.Tensor] = []
    if not latent:
        logits = state.prefill(embeds, attention_mask, logits=True)
    else:
        hidden = state.prefill(embeds, attention_mask, logits=False)
        ones = attention_mask.new_ones(batch)
        transform = run["plan"].latent_transform
        for step in range(num_latent):
            thought = model.project(hidden)
            if transform is not None:
                thought = transform(step, thought)
            latents.append(thought)
            hidden = state.step(thought.unsqueeze(1), ones, logits=False)
        for token in [model.eot_id] + run["forced"]:
            ids = torch.full((batch, 1), token, dtype=torch.long, device=input_ids.device)
            logits = state.step(model.embed(ids), ones, logits=True)
    return _answer(model, state, logits, run), latents


def _answer(model, state: _Session, logits: torch.Tensor, run: dict) -> torch.Tensor:
    """The token loop: the eager loop's rules, the all-finished check every `SYNC_EVERY` tokens (every
    token when sampling)."""
    device = logits.device
    batch = logits.shape[0]
    eos = model.tokenizer.eos_token_id
    forced, max_new, min_new = run["forced"], run["max_new_tokens"], run["min_new_tokens"]
    early = token_processors(run["suppress"], min_new, eos, device)
    late = token_processors(run["suppress"], 0, eos, device)
    generated, finished = token_buffers(model.pad_id, batch, max_new, forced, device)
    steps = len(forced)
    # sampling draws from a generator shared across batches: no draw after the eager loop would stop
    every = 1 if run["sampling"].get("do_sample") else SYNC_EVERY
    for position in range(len(forced), max_new):
        logits = apply_processors(early if position < min_new else late, generated[:, :position], logits)
        next_ids = run["sample"](logits, **run["sampling"]).masked_fill(finished, model.pad_id)
        generated[:, position] = next_ids
        steps = position + 1
        if eos is not None:
            finished = finished | (next_ids == eos)
        check = steps >= min_new and (steps - min_new) % every == 0
        if steps == max_new or (check and bool(finished.all())):
            break
        logits = state.step(model.embed(next_ids.unsqueeze(1)), ~finished, logits=True)
    return generated[:, :steps]


# --------------------------------------------------------------------------------------------------
# LoRA merged for decoding


@contextlib.contextmanager
def prepared(model, config: DecodingConfig, kind: str | None = None):
    """Around a whole `generate` call (`kind`: its `engine`, worked out once): with a fast engine, each
    LoRA projection runs as ONE linear layer with the weight W + scale * B @ A (dropout is off while
    decoding), instead of three matmuls, a dropout, a scale and an add per projection (most of a LoRA
    model's ops). The originals are put back afterwards, untouched. Merged weights are kept while none
    of W, A, B changes (their version counters), and with the static caches until `release`."""
    kind = kind or engine(model, config)
    layers = _plain_lora_layers(model) if kind != "eager" else None
    if not layers:
        yield
        return
    originals = [(layer.base_layer, layer.base_layer.weight) for layer in layers]
    try:
        for layer in layers:
            layer.base_layer.weight = _merged_weight(layer)
        _merging.add(id(model.hf_model))
        with model.lm.disable_adapter():
            yield
    finally:
        _merging.discard(id(model.hf_model))
        for base, weight in originals:
            base.weight = weight


def release(model) -> None:
    """Free what fast decoding keeps for `model` between `generate` calls: its static KV caches (with
    the CUDA graphs captured on them) and its merged LoRA weights (a copy of every adapted projection).
    The next call builds them again. `codi.inference.evaluate.evaluate` calls it when it returns, so
    that an evaluation during training gives that memory back to training."""
    _sessions.pop(model.hf_model, None)
    for module in model.lm.modules():
        _merged.pop(module, None)


def _plain_lora_layers(model) -> list | None:
    """The LoRA linear layers when every one is plain (one active adapter, no variant, not merged)
    and their merged copies fit `_MERGE_LIMIT_BYTES`; else None (decode with the adapters as they are)."""
    if not model.is_lora:
        return None
    from peft.tuners.lora import Linear, LoraLayer

    from ..fused_lora import FusedLoraLinear  # the same layer, trained through one autograd node

    layers = [module for module in model.lm.modules() if isinstance(module, LoraLayer)]
    size = 0
    for layer in layers:
        adapters = list(layer.active_adapters)
        if (
            type(layer) not in (Linear, FusedLoraLinear)
            or len(adapters) != 1
            or layer.merged
            or layer.lora_variant
        ):
            return None
        if adapters[0] not in layer.lora_A:
            return None
        size += layer.base_layer.weight.numel() * layer.base_layer.weight.element_size()
    return layers if layers and size <= _MERGE_LIMIT_BYTES else None


def _merged_weight(layer) -> torch.nn.Parameter:
    adapter = layer.active_adapters[0]
    weight, a, b = layer.base_layer.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    key = (id(weight), weight._version, a._version, b._version, layer.scaling[adapter], weight.dtype)
    found = _merged.get(layer)
    if found is not None and found[0] == key:
        return found[1]
    merged = weight.detach() + layer.get_delta_weight(adapter).to(weight.dtype)
    same = found is not None and (found[1].shape, found[1].dtype) == (merged.shape, merged.dtype)
    if same and found[1].device == merged.device:
        found[1].copy_(merged)  # in place: graphs captured on it stay valid
        _merged[layer] = (key, found[1])
        return found[1]
    _generation[0] += 1  # a new tensor: sessions (and their graphs) made before do not apply
    _merged[layer] = (key, torch.nn.Parameter(merged, requires_grad=False))
    return _merged[layer][1]

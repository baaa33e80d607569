"""Tiny offline models and tokenizers for tests, benchmarks and examples (no hub access needed)."""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .offline_models import random_causal_lm, save_model_and_tokenizer, train_tokenizer

# Llama-3's pre-tokenizer pattern: digits in groups of up to 3, never glued to the space before them.
LLAMA3_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

_CORPUS = [
    "Tom has 12 apples and buys 30 more. How many apples does he have now?",
    "A shop sells 7 pens for 3 dollars each. The answer is: 21",
    "<<600*30/100=180>> <<600*10/100=60>> <<180+60=240>> #### 360",
    "She eats three for breakfast every morning and bakes muffins with four. The answer is: -5",
    "John cuts his grass to 2 inches. It grows .5 inches per month. How much does he pay per year?",
    "The answer is: 1234567890 0.5 100 42 7",
]


def make_tokenizer(
    style: str = "gpt2", vocab_size: int = 400, corpus: list[str] | None = None
) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer.

    style "gpt2": GPT-2's pre-tokenizer (a space is glued to the number after it: " 360").
    style "llama3": Llama-3's pattern (the space before a number is its own token: " ", "360").
    """
    tokenizer = Tokenizer(models.BPE())
    if style == "gpt2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif style == "llama3":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return train_tokenizer(
        tokenizer, trainer, (corpus or _CORPUS) * 4, eos="<|endoftext|>", unk="<|endoftext|>"
    )


def make_model(
    arch: str,
    vocab_size: int,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    seed: int = 0,
    max_positions: int = 512,
    tie_word_embeddings: bool = True,
):
    """A randomly initialised tiny GPT-2 or Llama (dropout off so tests are deterministic).

    `tie_word_embeddings=False` (Llama only) gives an untied LM head, as in Llama-3-8B.

    `max_positions` 1024 (GPT-2's own) lets a preset's max_token_num 1000 run on the tiny tokenizer.
    """
    return random_causal_lm(
        arch,
        vocab_size,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=max(1, heads // 2),
        mlp_ratio=2,
        max_positions=max_positions,
        special_token_id=0,
        tie_word_embeddings=tie_word_embeddings,
        seed=seed,
    )


def save_tiny_model(directory: str, arch: str = "gpt2", style: str | None = None, **model_kwargs) -> str:
    """Write a tiny model + tokenizer as an HF folder, usable as `--model_name_or_path`."""
    style = style or ("llama3" if arch == "llama" else "gpt2")
    tokenizer = make_tokenizer(style)
    return save_model_and_tokenizer(directory, make_model(arch, len(tokenizer), **model_kwargs), tokenizer)

"""Tiny random models for tests and benchmarks (as transformers' own tests build them).

`tiny_model(dir)` writes a 2-layer Llama with a ~300-token BPE vocabulary trained on a few
GSM8K questions and a ChatML template, so every code path (chat templates, padding,
generation, LoRA, attention hooks) runs in milliseconds on CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from primekd.core.data import load_examples

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 320, examples: int | None = 200):
    """A byte-level BPE trained on `examples` GSM8K training questions (None: all 7,473,
    which give about 25,600 tokens at most), with ChatML's special tokens and template."""
    corpus = [f"{e.question}\n{e.answer}" for e in load_examples("train", limit=examples)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_model(
    directory: str | Path, seed: int = 0, layers: int = 2, vocab_size: int = 320,
    tokenizer: Any = None, hidden: int = 32, positions: int = 1024,
) -> Path:
    """Write a tiny random Llama + tokenizer to `directory` and return it; `tokenizer`
    (e.g. SmolLM2's, for a real vocabulary size) replaces the tiny BPE one."""
    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    tokenizer = tokenizer or tiny_tokenizer(vocab_size)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory

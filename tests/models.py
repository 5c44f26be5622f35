"""Tiny seeded transformers models built from configs, shared by the core, API and end-to-end tests."""

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.normalizers import Lowercase
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from core.compression.metrics import PROBE_SENTENCES

WORD = re.compile(r"\w+|[^\w\s]")


def tiny_bert(seed: int = 0, vocab_size: int = 512) -> BertModel:
    """A 2-layer BERT encoder (hidden 64, vocab 512 unless told), fp32, eval mode, weights seeded."""
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    return BertModel(config).eval()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama causal LM (hidden 64, vocab 512, grouped KV heads), input and output embeddings tied."""
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_model_folder(model: PreTrainedModel, directory: Path) -> Path:
    """Write `model` as a Hugging Face folder (config.json + model.safetensors) and return the folder."""
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def save_sharded_folder(model: PreTrainedModel, directory: Path, max_shard_size: str = "100KB") -> Path:
    """Write `model` as a sharded folder: `model-0000i-of-0000n.safetensors` files and the
    `model.safetensors.index.json` mapping each tensor to its shard (tiny_llama makes 5 shards)."""
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=max_shard_size)
    return directory


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style word-level tokenizer over the probe sentences' words (ids below tiny_bert's vocab size)."""
    words = sorted({word for text in PROBE_SENTENCES for word in WORD.findall(text.lower())})
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = Lowercase()
    backend.pre_tokenizer = Whitespace()
    backend.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )

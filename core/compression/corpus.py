"""Calibration data: the default text corpus and the token batches that data-driven steps (gptq, mixed) run on.

The default corpus is the 206 Wikipedia articles shipped in gensim's test data (a core dependency), so a job needs
no upload and no network. lee_background.cor, also in gensim, is deliberately not used: the benchmarks measure
perplexity on it, and calibrating on the evaluation text would flatter every method.
"""

import bz2
import importlib.util
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from xml.etree.ElementTree import iterparse

import torch

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MIN_ARTICLE_CHARS = 200
# Rough wikitext cleanup, applied in order: what remains is readable prose, which is all calibration needs.
_MARKUP = (
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")


@dataclass
class CalibrationBatch:
    """`input_ids` of shape (num_samples, seq_len) and notes saying where the tokens came from."""

    input_ids: torch.Tensor
    notes: list[str] = field(default_factory=list)


@lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    return tuple(_articles(_gensim_test_data() / WIKI_FILE))


def default_corpus() -> list[str]:
    """The default calibration texts: 200-odd English Wikipedia articles with their markup roughly stripped."""
    return list(_corpus())


def _gensim_test_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("gensim is not installed: it ships the default calibration corpus")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data"


def _articles(path: Path) -> list[str]:
    articles = []
    with bz2.open(path) as stream:
        # A file of an installed package, never user input: the stdlib parser is fine here.
        for _, element in iterparse(stream):  # noqa: S314
            if element.tag.rsplit("}", 1)[-1] == "text" and element.text:
                text = strip_wiki_markup(element.text)
                if len(text) >= MIN_ARTICLE_CHARS:  # drops redirects and stubs
                    articles.append(text)
            element.clear()
    return articles


def strip_wiki_markup(text: str) -> str:
    """Wikitext to rough plain text: templates, references, tables and tags removed, links replaced by labels."""
    previous = None
    while previous != text:  # templates nest: remove the innermost ones until none is left
        previous, text = text, _TEMPLATE.sub("", text)
    for pattern, replacement in _MARKUP:
        text = pattern.sub(replacement, text)
    return text.strip()


def calibration_batch(
    texts: list[str], tokenizer: Any, num_samples: int, seq_len: int, vocab_size: int, seed: int = 0
) -> CalibrationBatch:
    """`num_samples` windows of `seq_len` consecutive tokens from `texts`, joined into one token stream.

    Without a tokenizer (or without enough text) the rows are seeded random token ids below `vocab_size`, and
    the notes say so. Example: `calibration_batch(default_corpus(), tok, 32, 512, model.config.vocab_size)`.
    """
    if tokenizer is None:
        note = f"no tokenizer: calibrated on {num_samples} x {seq_len} seeded random token ids"
        return CalibrationBatch(_random_ids(num_samples, seq_len, vocab_size, seed), [note])
    stream = _token_stream(texts, tokenizer, num_samples * seq_len)
    if stream.numel() < seq_len:
        note = f"the calibration texts give only {stream.numel()} tokens: calibrated on seeded random token ids"
        return CalibrationBatch(_random_ids(num_samples, seq_len, vocab_size, seed), [note])
    return _windows(stream, num_samples, seq_len)


def _token_stream(texts: list[str], tokenizer: Any, needed: int) -> torch.Tensor:
    """Token ids of the texts in order, stopping once `needed` tokens are there (tokenizing is the slow part)."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= needed:
            break
    return torch.tensor(ids[:needed], dtype=torch.long)


def _windows(stream: torch.Tensor, num_samples: int, seq_len: int) -> CalibrationBatch:
    available = stream.numel() // seq_len
    rows = stream[: available * seq_len].view(available, seq_len)
    notes = [f"calibrated on {num_samples} x {seq_len} tokens of text"]
    if available < num_samples:  # a small dataset is reused rather than padded with noise
        rows = rows.repeat((num_samples + available - 1) // available, 1)[:num_samples]
        notes = [f"the calibration texts fill only {available} windows of {seq_len} tokens; reused to {num_samples}"]
    return CalibrationBatch(rows, notes)


def _random_ids(num_samples: int, seq_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)

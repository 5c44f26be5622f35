"""The default calibration corpus and the token batches cut from it."""

import torch

from core.compression.corpus import calibration_batch, default_corpus, strip_wiki_markup
from tests.models import tiny_tokenizer


def test_default_corpus_is_wikipedia_prose_not_the_evaluation_news() -> None:
    corpus = default_corpus()
    assert len(corpus) > 100 and all(len(text) >= 200 for text in corpus)
    assert corpus[0].startswith("Anarchism is a political philosophy")
    leftovers = sum(text.count(markup) for text in corpus for markup in ("{{", "[[", "<ref"))
    assert leftovers < 50  # rough stripping: a few malformed templates or links may survive, never most


def test_wiki_markup_is_stripped_roughly() -> None:
    text = "'''Bold''' [[Target|label]] and [[plain]]{{cite|x={{nested}}}}<ref>note</ref>\n== Heading =="
    assert strip_wiki_markup(text) == "Bold label and plain\nHeading"


def test_batches_are_windows_of_the_token_stream() -> None:
    tokenizer = tiny_tokenizer()
    texts = ["the quick brown fox jumps over the lazy dog"] * 20
    batch = calibration_batch(texts, tokenizer, num_samples=4, seq_len=8, vocab_size=512)
    assert batch.input_ids.shape == (4, 8)
    stream = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert batch.input_ids[0].tolist() == stream[:8]
    assert batch.notes == ["calibrated on 4 x 8 tokens of text"]


def test_short_text_is_reused_and_missing_tokenizer_gives_seeded_random_ids() -> None:
    short = calibration_batch(["the quick brown fox jumps over the lazy dog"], tiny_tokenizer(), 3, 4, 512)
    assert short.input_ids.shape == (3, 4) and "reused" in short.notes[0]
    first = calibration_batch([], None, 2, 5, 100, seed=3)
    assert torch.equal(first.input_ids, calibration_batch([], None, 2, 5, 100, seed=3).input_ids)
    assert int(first.input_ids.max()) < 100 and "random token ids" in first.notes[0]

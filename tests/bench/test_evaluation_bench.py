"""bench.evaluation's datasets from gensim's test data: the 1,225 rated lee.cor pairs and the 200 review sentences
as balanced two-choice rows, in the shapes core.service.datasets accepts."""

import pytest

pytest.importorskip("gensim")

from bench.evaluation import CHOICES, REVIEW_SHOTS, news_rows, review_sentences, sentiment_rows, sts_rows  # noqa: E402 (after the skip)


def test_sts_rows_are_every_rated_pair_of_the_50_documents_once() -> None:
    rows = sts_rows()
    assert len(rows) == 1225 and len({(row["text"], row["text_pair"]) for row in rows}) == 1225
    assert len({row["text"] for row in rows} | {row["text_pair"] for row in rows}) == 50
    assert all(0 < row["score"] <= 1 and row["text"] != row["text_pair"] for row in rows)


def test_sentiment_rows_alternate_labels_so_any_prefix_is_balanced() -> None:
    rows = sentiment_rows()
    assert len(rows) == 200 and [row["answer"] for row in rows[:4]] == [0, 1, 0, 1]
    assert sum(row["answer"] for row in rows[:100]) == 50
    assert all(row["choices"] == CHOICES and row["question"].startswith("Review: ") for row in rows)
    # the few-shot examples are hand-written: none of them is a sentence being evaluated
    evaluated = {sentence for sentence, _ in review_sentences()}
    assert not evaluated & {shot for shot, _ in REVIEW_SHOTS}
    assert all(row["question"].endswith("Sentiment:") for row in rows)
    assert len(news_rows(24)) == 24 and all(row["text"].strip() for row in news_rows(24))

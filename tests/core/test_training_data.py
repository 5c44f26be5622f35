"""Training windows: length-bucketed batches cover every window once per epoch with little padding, and a step's
batch depends on the step alone (a resumed run sees the same data)."""

import random

import torch

from core.compression.configs.distill import Distill
from core.compression.training.data import length_bucketed, prepare
from tests.core.training_helpers import texts
from tests.models import tiny_tokenizer


def _padded_tokens(lengths: list[int], batches: list[list[int]]) -> int:
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)


def test_length_buckets_visit_every_row_once_with_little_padding() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(2, 64) for _ in range(4096)]
    rows = [[0] * n for n in lengths]
    batches = length_bucketed(rows, 8, random.Random(1))
    assert sorted(i for batch in batches for i in batch) == list(range(len(rows)))
    assert all(len(batch) == 8 for batch in batches)
    shuffled = list(range(len(rows)))
    random.Random(1).shuffle(shuffled)
    unbucketed = [shuffled[i : i + 8] for i in range(0, len(shuffled), 8)]
    assert _padded_tokens(lengths, batches) < 1.1 * sum(lengths)
    assert _padded_tokens(lengths, unbucketed) > 1.5 * sum(lengths)


def test_a_steps_batch_depends_on_the_step_alone() -> None:
    config = Distill(batch_size=4, seq_len=16)
    first = prepare(texts(), tiny_tokenizer(), config, varied_lengths=True)
    again = prepare(texts(), tiny_tokenizer(), config, varied_lengths=True)
    per_epoch = len(first.train.rows) // 4
    visited = [first.train_batch(step, 4, 0) for step in range(per_epoch + 3)]  # into the second epoch
    for step in (per_epoch + 2, 1, per_epoch):
        for key, value in again.train_batch(step, 4, 0).items():
            assert torch.equal(value, visited[step][key])

"""Training text as token windows: rows split into train and held-out first (so no held-out text is ever trained
on), then each row cut into windows of at most `seq_len` tokens, batched with right padding."""

import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from core.compression.configs.training import TrainingStep
from core.errors import InvalidSpec

MAX_EVAL_WINDOWS = 64
BUCKET_BATCHES = 32  # batches whose rows are sorted by length together
MAX_PASSES = 50  # more passes over the same windows than this memorises the text instead of recovering the model
Inputs = dict[str, torch.Tensor]


@dataclass
class Windows:
    """Token windows (each a list of ids including special tokens) and the pad id used to batch them."""

    rows: list[list[int]]
    pad_id: int

    def batch(self, indices: list[int]) -> Inputs:
        selected = [self.rows[i] for i in indices]
        width = max(len(row) for row in selected)
        input_ids = torch.tensor([row + [self.pad_id] * (width - len(row)) for row in selected])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in selected])
        return {"input_ids": input_ids, "attention_mask": mask}


@dataclass
class TrainingData:
    train: Windows
    heldout: Windows
    steps: int
    notes: list[str]
    _epoch: dict[tuple[int, int, int], list[list[int]]] = field(default_factory=dict, repr=False)

    def train_batch(self, step: int, batch_size: int, seed: int) -> Inputs:
        """The batch of optimizer step `step`: a pure function of the step, so a resumed run sees the same data.
        Each epoch visits every window once (bar the last partial batch), in length-bucketed batches."""
        epoch, index = divmod(step, len(self.train.rows) // batch_size)
        key = (epoch, batch_size, seed)
        if key not in self._epoch:
            self._epoch.clear()  # one epoch at a time
            self._epoch[key] = length_bucketed(self.train.rows, batch_size, random.Random(seed * 1_000_003 + epoch))
        return self.train.batch(self._epoch[key][index])

    def heldout_batches(self, batch_size: int) -> list[Inputs]:
        by_length = sorted(range(len(self.heldout.rows)), key=lambda i: len(self.heldout.rows[i]))
        return [self.heldout.batch(by_length[i : i + batch_size]) for i in range(0, len(by_length), batch_size)]


def length_bucketed(rows: list[list[int]], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Full batches of row indices in a random order, each drawn from a random chunk of `BUCKET_BATCHES` batches
    sorted by length: rows in a batch have similar lengths, so little of the batch is padding (with windows of
    random length, padding to the longest otherwise wastes ~40% of the compute)."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    batches = []
    span = batch_size * BUCKET_BATCHES
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: len(rows[i]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


def prepare(texts: list[str], tokenizer: Any, config: TrainingStep, varied_lengths: bool) -> TrainingData:
    """Split rows, tokenize into windows and check there is enough data for the requested steps.

    varied_lengths: cut windows of random length (at least an eighth of `seq_len`), so that an encoder learns
    short inputs as well as long ones; otherwise full windows (a language model's perplexity is measured on those).
    """
    if tokenizer is None:
        raise InvalidSpec(f"{config.type}: the model has no tokenizer, so the dataset's text cannot be used")
    texts = [text for text in texts if text.strip()]
    if len(texts) < 2:
        raise InvalidSpec(f"{config.type}: the dataset needs at least 2 non-empty rows (one is held out), "
                          f"got {len(texts)}", details={"field": "dataset_id", "rows": len(texts)})
    train_rows, heldout_rows = split_rows(texts, config.eval_fraction, config.seed)
    rng = random.Random(config.seed)
    train = _windows(train_rows, tokenizer, config.seq_len, rng if varied_lengths else None)
    heldout = _windows(heldout_rows, tokenizer, config.seq_len, rng if varied_lengths else None)
    heldout.rows = heldout.rows[:MAX_EVAL_WINDOWS]
    steps = _steps(config, len(train.rows))
    notes = [f"{len(train_rows)} rows ({len(train.rows)} windows of ≤ {config.seq_len} tokens) trained on, "
             f"{len(heldout_rows)} rows held out ({len(heldout.rows)} windows evaluated)"]
    return TrainingData(train, heldout, steps, notes)


def split_rows(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded random `fraction` of the rows (at least one) held out; the rest, in order, for training."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    held = set(order[: max(1, round(fraction * len(texts)))])
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def _windows(texts: list[str], tokenizer: Any, seq_len: int, rng: random.Random | None) -> Windows:
    prefix, suffix = special_tokens(tokenizer)
    body = max(1, seq_len - len(prefix) - len(suffix))
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        start = 0
        while start < len(ids):
            length = body if rng is None else rng.randint(max(1, body // 8), body)
            rows.append(prefix + ids[start : start + length] + suffix)
            start += length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Windows(rows, pad)


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (e.g. [CLS] and [SEP], or a BOS), found by tokenizing a
    probe word with and without them: every tokenizer can do that, unlike `build_inputs_with_special_tokens`."""
    plain = tokenizer("the", add_special_tokens=False)["input_ids"]
    full = tokenizer("the", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def _steps(config: TrainingStep, windows: int) -> int:
    if windows < config.batch_size:
        raise InvalidSpec(f"{config.type}: the training part of the dataset gives {windows} windows, fewer than "
                          f"one batch ({config.batch_size}); upload more text or lower batch_size",
                          details={"field": "dataset_id", "windows": windows, "batch_size": config.batch_size})
    if config.epochs is not None:
        return max(1, math.ceil(config.epochs * windows / config.batch_size))
    passes = config.max_steps * config.batch_size / windows
    if passes > MAX_PASSES:
        raise InvalidSpec(f"{config.type}: the dataset is too small for {config.max_steps} steps of "
                          f"{config.batch_size}: each of its {windows} training windows would be seen "
                          f"{passes:.0f} times (at most {MAX_PASSES}); upload more text or lower max_steps",
                          details={"field": "max_steps", "windows": windows})
    return config.max_steps



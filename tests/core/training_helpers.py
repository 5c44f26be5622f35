"""Tiny training setups shared by the distill and lora tests: seeded texts over the tiny tokenizer's words and a
context whose teacher is a copy of the original model."""

import copy
import random
from typing import Any

from torch import nn

from core.compression.metrics import PROBE_SENTENCES
from core.compression.pipeline import run_pipeline
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext, StepReport
from tests.models import tiny_tokenizer

FAST = {"batch_size": 4, "seq_len": 16, "checkpoint_every": 5}


def texts(rows: int = 80, seed: int = 0) -> list[str]:
    """Rows of 4 to 20 random words from the probe sentences (all in the tiny tokenizer's vocabulary)."""
    words = " ".join(PROBE_SENTENCES).split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 20))) for _ in range(rows)]


def run(model: nn.Module, steps: list[dict], rows: list[str] | None = None,
        **context: Any) -> tuple[ModelState, list[StepReport]]:
    """Run `steps` on `model` in place, the teacher being a copy of `model` as it was; `context` sets other
    StepContext fields (work_dir, should_stop, report)."""
    state = ModelState(model, tokenizer=tiny_tokenizer())
    original, data = copy.deepcopy(model), rows or texts()
    ctx = StepContext(texts=lambda dataset_id: data, teacher=lambda ref: copy.deepcopy(original), **context)
    return state, run_pipeline(state, JobSpec.model_validate({"steps": steps}).steps, ctx)

"""Running one recipe on a tiny model and checking that the saved artifact computes the same thing."""

from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.compression.artifact import load_compressed, save_compressed
from core.compression.pipeline import run_pipeline
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext, StepReport


def run_steps(model: nn.Module, *steps: dict[str, Any]) -> tuple[ModelState, list[StepReport]]:
    """Validate `steps` like the API does and apply them to `model` in place through the real pipeline."""
    state = ModelState(model=model)
    return state, run_pipeline(state, JobSpec.model_validate({"steps": list(steps)}).steps, StepContext())


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        result = model(**inputs)
    logits = getattr(result, "logits", None)
    return logits if logits is not None else result.last_hidden_state


def reloaded(state: ModelState, directory: Path) -> nn.Module:
    return load_compressed(save_compressed(state, directory / "artifact", {}))


def assert_reload_identical(state: ModelState, directory: Path, inputs: dict[str, torch.Tensor]) -> nn.Module:
    loaded = reloaded(state, directory)
    assert torch.equal(outputs(state.model, inputs), outputs(loaded, inputs))
    return loaded

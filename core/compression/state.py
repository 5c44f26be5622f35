"""What flows through a pipeline: the model, how its weights are packed, the context a step runs in."""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Encoding:
    """A weight stored in a packed form: `format` names the decoder, `tensors` are written to safetensors.

    The in-memory model always holds the decoded (float) weight so that later steps and metrics see exactly what
    a loaded artifact will compute; the encoding is what the saver writes instead of that float tensor.
    """

    format: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class ModelState:
    """The model being compressed and the packed encodings of its parameters, keyed by parameter name."""

    model: nn.Module
    encodings: dict[str, Encoding] = field(default_factory=dict)


@dataclass
class StepReport:
    """What a step tells the user: numeric metrics (stored per step) and plain-language notes."""

    metrics: dict[str, float | int | str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _never_stop() -> bool:
    return False


def _ignore_progress(fraction: float, message: str) -> None:
    return None


@dataclass
class StepContext:
    """How core talks to whoever runs it, without knowing about databases or queues.

    report(fraction, message): progress within the current step, fraction in [0, 1].
    should_stop(): True once the job was cancelled; long steps poll it between units of work.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[float, str], None] = _ignore_progress
    should_stop: Callable[[], bool] = _never_stop

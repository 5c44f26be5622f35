"""Run a recipe: each step's handler in order, with progress, cancellation and a report per step."""

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.compression.registry import handler_for
from core.compression.select import held_back_note
from core.compression.spec import StepConfig
from core.compression.state import ModelState, StepContext, StepReport
from core.errors import JobCancelled, ServiceError, StepFailed


@dataclass
class StepHooks:
    """Called around each step; the worker records step status and metrics through these."""

    started: Callable[[int, StepConfig], None] = lambda index, config: None
    finished: Callable[[int, StepReport], None] = lambda index, report: None


def run_pipeline(
    state: ModelState,
    steps: Sequence[StepConfig],
    ctx: StepContext,
    hooks: StepHooks | None = None,
    evaluate: Callable[[ModelState], dict[str, Any]] | None = None,
) -> list[StepReport]:
    """Apply `steps` to `state` in place and return one report per step.

    `evaluate`, when given, measures the model after each step (e.g. output cosine vs the original) and its
    numbers are merged into that step's metrics, so the user sees what each step cost.
    """
    hooks = hooks or StepHooks()
    reports = []
    for index, config in enumerate(steps):
        if ctx.should_stop():
            raise JobCancelled(f"cancelled before step {index} ({config.type})")
        hooks.started(index, config)
        report = _run_step(state, config, _step_context(ctx, index, len(steps)))
        if (note := held_back_note(state.model, config)) is not None:
            report.notes.append(note)
        if evaluate is not None:
            report.metrics.update(evaluate(state))
        hooks.finished(index, report)
        reports.append(report)
    return reports


def _run_step(state: ModelState, config: StepConfig, ctx: StepContext) -> StepReport:
    handler = handler_for(config)
    try:
        return handler(state, config, ctx)
    except ServiceError:
        raise
    except Exception as exc:  # a bug or numerical failure inside a step: name the step, keep the cause
        raise StepFailed(f"step {config.type} failed: {type(exc).__name__}: {exc}") from exc


def _step_context(ctx: StepContext, index: int, total: int) -> StepContext:
    """Map a step's own progress in [0, 1] onto the job's overall progress; each step gets its own work dir (its
    checkpoints), the same one when a restarted job runs the recipe again."""

    def report(fraction: float, message: str) -> None:
        ctx.report((index + min(max(fraction, 0.0), 1.0)) / total, message)

    work_dir = None if ctx.work_dir is None else ctx.work_dir / f"step-{index:02d}"
    return dataclasses.replace(ctx, report=report, work_dir=work_dir)

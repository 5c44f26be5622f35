"""One recovery-training run, shared by the distill and lora steps: teacher, data, evaluation before and after,
the loop with checkpoints, and the numbers the step reports."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from core.compression.configs.training import TrainingStep
from core.compression.sparsity.masks import SPARSE_BITMASK
from core.compression.state import ModelState, StepContext
from core.compression.training import data as training_data
from core.compression.training.checkpoint import Checkpoints, fingerprint
from core.compression.training.loop import train
from core.compression.training.objectives import Distillation, evaluate, is_causal_lm, task_loss
from core.errors import InvalidSpec

Metrics = dict[str, float | int | str]


@dataclass
class Outcome:
    """Train and held-out numbers of a run, ready for a StepReport."""

    metrics: Metrics = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def load_teacher(config: TrainingStep, ctx: StepContext) -> nn.Module:
    """The frozen teacher on `ctx.device`; an unknown ref is the user's error."""
    try:
        teacher = ctx.teacher(config.teacher)
    except LookupError as exc:
        raise InvalidSpec(f"{config.type}: teacher {config.teacher!r} cannot be loaded: {exc}",
                          details={"field": "teacher"}) from exc
    teacher = teacher.to(ctx.device).eval()
    teacher.requires_grad_(False)
    return teacher


def prepare_data(state: ModelState, config: TrainingStep, ctx: StepContext) -> training_data.TrainingData:
    try:
        texts = ctx.texts(config.dataset_id)
    except LookupError as exc:
        raise InvalidSpec(f"{config.type}: dataset {config.dataset_id!r}: {exc}",
                          details={"field": "dataset_id"}) from exc
    return training_data.prepare(texts, state.tokenizer, config, varied_lengths=not is_causal_lm(state.model))


@contextmanager
def only_trainable(model: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """Gradients for `params` alone while training; every parameter trainable again afterwards."""
    model.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    try:
        yield
    finally:
        model.requires_grad_(True)


def fit(state: ModelState, config: TrainingStep, ctx: StepContext, objective: Distillation,
        params: dict[str, nn.Parameter], data: training_data.TrainingData,
        task: bool = False) -> Outcome:
    """Evaluate, train `params` (resuming from a checkpoint of the same run), evaluate again."""
    if not params:
        raise InvalidSpec(f"{config.type}: targets {config.targets} minus exclude {config.exclude} leave nothing "
                          "to train", details={"targets": config.targets, "exclude": config.exclude})
    model, device = state.model, ctx.device
    heldout = [_to(batch, device) for batch in data.heldout_batches(config.batch_size)]
    before = evaluate(objective, model, heldout)
    ctx.report(0.05, f"held-out before training: {_summary(before)}")

    def loss_at(step: int) -> torch.Tensor:
        batch = _to(data.train_batch(step, config.batch_size, config.seed), device)
        with _autocast(config, device):
            return task_loss(model, batch) if task else objective.compare(model, batch)[0]

    checkpoints = Checkpoints(ctx.work_dir, fingerprint(config.model_dump_json(), params))
    with only_trainable(model, params):
        progress = train(params, loss_at, data.steps, config.lr, ctx, checkpoints, config.checkpoint_every)
    after = evaluate(objective, model, heldout)
    ctx.report(0.95, f"held-out after training: {_summary(after)}")
    return Outcome(_metrics(before, after, progress.losses, params), list(data.notes))


def _autocast(config: TrainingStep, device: torch.device | str) -> torch.autocast:
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=config.precision == "bf16")


def pruned_sparsity(state: ModelState) -> float:
    """Fraction of exact zeros in the weights stored sparse (pruned); 0 when none is."""
    names = [name for name, e in state.encodings.items() if e.format == SPARSE_BITMASK]
    weights = [_tensor(state.model, name) for name in names]
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)


def _metrics(before: dict, after: dict, losses: list[float], params: dict[str, nn.Parameter]) -> Metrics:
    tail = losses[-max(1, len(losses) // 10):]
    metrics: Metrics = {
        "train_steps": len(losses),
        "train_loss_first": losses[0],
        "train_loss_last": sum(tail) / len(tail),
        "params_trained": sum(p.numel() for p in params.values()),
    }
    for key, value in before.items():
        metrics[f"heldout_{key}_before"] = value
    for key, value in after.items():
        metrics[f"heldout_{key}_after"] = value
    return metrics


def _summary(numbers: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in numbers.items())


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}

"""Knowledge distillation: the compressed model (or a shallower copy) learns to reproduce the original's outputs."""

from torch import nn

from core.compression.configs.distill import Distill
from core.compression.configs.training import DistillLoss
from core.compression.registry import register_step
from core.compression.select import is_selected
from core.compression.state import ModelState, StepContext, StepReport, encoded_bytes
from core.compression.training import constraints, student
from core.compression.training.objectives import Distillation, default_loss, is_causal_lm
from core.compression.training.run import Outcome, fit, load_teacher, prepare_data, pruned_sparsity
from core.errors import InvalidSpec


@register_step(Distill)
def distill_step(state: ModelState, config: Distill, ctx: StepContext) -> StepReport:
    """Distil the teacher (default: the original upload) into `state.model`, in place.

    With `student: {"layers": k}` the model first keeps k of its transformer layers (a recorded rewrite), each
    imitating the teacher layer it came from. Pruned weights stay exactly zero and quantized weights stay on their
    grid or codebook (see `core.compression.training.constraints`); every trained encoding is rewritten at the end,
    and the report gives train and held-out numbers before and after, and the sparsity measured again.

    Example recipe step: `{"type": "distill", "student": {"layers": 3}, "max_steps": 400, "batch_size": 16}`.
    """
    loss = config.loss or default_loss(state.model)
    _check_loss(state.model, loss)
    teacher = load_teacher(config, ctx)
    data = prepare_data(state, config, ctx)
    notes = []
    layer_map = list(range(len(student.layer_stack(state.model)[1])))
    if config.student != "self":
        layer_map = student.shrink(state, config.student.count(len(layer_map)))
        notes.append(f"student keeps layers {layer_map} of {len(student.layer_stack(teacher)[1])}")
    candidates = _candidates(state.model, config)
    sparsity_before = pruned_sparsity(state)
    constrained = constraints.constrain(state, candidates)
    params = _params(state.model, candidates, set(constrained.frozen))
    objective = Distillation(teacher, loss, config.temperature, layer_map)
    with _attention_weights(state.model, teacher, loss.attention > 0):
        outcome = fit(state, config, ctx, objective, params, data)
    constraints.release(state, constrained)
    return _report(state, outcome, constrained, sparsity_before, pruned_sparsity(state), notes)


def _check_loss(model: nn.Module, loss: DistillLoss) -> None:
    if loss.logits_kl and not is_causal_lm(model):
        raise InvalidSpec("distill: loss.logits_kl needs a model with a language-model head; this one outputs hidden "
                          "states: use loss.hidden_mse", details={"field": "loss.logits_kl"})


def _candidates(model: nn.Module, config: Distill) -> list[str]:
    """Parameter names that train: in a selected module, not an embedding table unless asked, not shared."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    return [
        name
        for name, p in model.named_parameters()
        if is_selected(name.rpartition(".")[0], config)
        and (config.train_embeddings or id(p) not in embeddings)
        and uses[id(p)] == 1
    ]


def _params(model: nn.Module, candidates: list[str], frozen: set[str]) -> dict[str, nn.Parameter]:
    """The live trainable tensors: a constrained weight trains through its parametrization's `original`."""
    wanted = set(candidates) - frozen
    return {name: p for name, p in model.named_parameters() if _canonical(name) in wanted}


def _canonical(name: str) -> str:
    """`a.parametrizations.weight.original` is how torch names the trained tensor behind `a.weight`."""
    return name.replace(".parametrizations.", ".").removesuffix(".original")


class _attention_weights:  # noqa: N801 (used as a context manager, like contextlib's)
    """Eager attention while training when the loss needs attention probabilities (fused kernels return none)."""

    def __init__(self, model: nn.Module, teacher: nn.Module, needed: bool) -> None:
        self.models, self.needed = (model, teacher), needed
        self.previous = getattr(model.config, "_attn_implementation", None)

    def __enter__(self) -> None:
        if self.needed:
            for m in self.models:
                m.set_attn_implementation("eager")

    def __exit__(self, *exc: object) -> None:
        if self.needed and self.previous:
            self.models[0].set_attn_implementation(self.previous)


def _report(state: ModelState, outcome: Outcome, constrained: constraints.Constrained, before: float, after: float,
            notes: list[str]) -> StepReport:
    metrics = dict(outcome.metrics)
    metrics.update({
        "sparsity_before": before,
        "sparsity_after": after,
        "encodings_retrained": len(constrained.forms),
        "encoded_bytes": encoded_bytes(state),
        "parameters": sum(p.numel() for p in state.model.parameters()),
    })
    notes = notes + outcome.notes + [
        "dropout off while training; pruned weights stayed exactly zero (their masks applied in every step)"]
    notes += [f"{name} ({fmt}) stays frozen: no trainable form for {fmt}" for name, fmt in constrained.frozen.items()]
    return StepReport(metrics=metrics, notes=notes)

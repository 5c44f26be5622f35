"""Which step orders a recipe may not use, and why: checked at submission (JobSpec validation), so a recipe that
cannot work is refused with the reason instead of failing halfway through a job.

Each rule names an earlier step and a later step that must not follow it. Add a rule where a family's order
matters; keep the reason actionable (what to move where).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from core.compression.configs.base import StepConfig

Match = Callable[[StepConfig], bool]
WEIGHT_STEPS = frozenset({"quantize", "prune", "decompose", "distill", "lora"})
ACTIVATION_QUANTIZATION = frozenset({"dynamic", "static", "smoothquant"})


def _is(step_type: str, methods: frozenset[str] | None = None) -> Match:
    return lambda step: step.type == step_type and (methods is None or getattr(step, "method", None) in methods)


def _changes_weights(step: StepConfig) -> bool:
    return step.type in WEIGHT_STEPS


def _trains(step: StepConfig) -> bool:
    return step.type in ("distill", "lora")


def _unmerged_adapters(step: StepConfig) -> bool:
    return step.type == "lora" and getattr(step, "merge", True) is False


def _packs_weights(step: StepConfig) -> bool:
    return step.type == "quantize" and getattr(step, "method", None) not in ACTIVATION_QUANTIZATION


def _whole_model(step: StepConfig) -> bool:
    # Narrower targets may not overlap: then the step itself checks the modules it selects at run time.
    return "*" in step.targets


@dataclass(frozen=True)
class OrderRule:
    earlier: Match
    later: Match
    reason: str


RULES = (
    OrderRule(_is("encode"), _changes_weights,
              "entropy coding (encode) must come after every step that changes weights; move it to the end"),
    OrderRule(_unmerged_adapters, _changes_weights,
              "lora with merge: false keeps its adapters beside frozen weights, so no step that changes weights "
              "may follow it; put it last or use merge: true"),
    OrderRule(lambda s: _packs_weights(s) and _whole_model(s), lambda s: _is("prune")(s) and _whole_model(s),
              "pruning must run before weight quantization (a packed weight cannot be pruned without losing its "
              "encoding); prune first, then quantize (Deep Compression's order)"),
    OrderRule(lambda s: _packs_weights(s) and _whole_model(s), lambda s: _is("decompose")(s) and _whole_model(s),
              "low-rank decomposition must run before weight quantization (factors of a packed weight would be "
              "float again); decompose first, then quantize"),
    OrderRule(_is("quantize", ACTIVATION_QUANTIZATION), _trains,
              "activation quantization replaces layers with inference kernels that cannot train; run distill/lora "
              "before it"),
)


def check_order(steps: Sequence[StepConfig]) -> None:
    """Raise ValueError naming the first pair of steps in an order that cannot work, and how to fix it."""
    for later_index, later in enumerate(steps):
        for earlier_index, earlier in enumerate(steps[:later_index]):
            for rule in RULES:
                if rule.earlier(earlier) and rule.later(later):
                    raise ValueError(f"step {later_index} ({_name(later)}) cannot follow step {earlier_index} "
                                     f"({_name(earlier)}): {rule.reason}")


def _name(step: StepConfig) -> str:
    method = getattr(step, "method", None)
    return f"{step.type}:{method}" if method else step.type

"""Which step orders a recipe may not use, and why: checked at submission (JobSpec validation), so a recipe that
cannot work is refused with the reason instead of failing halfway through a job.

Each rule looks at the traits of an earlier and a later step (never at their names) and returns why the later one
must not follow the earlier one, or None. Add a trait to the configs, and a rule here, where an order matters; keep
the reason actionable (what to move where).
"""

from collections.abc import Callable, Sequence

from core.compression.configs.base import StepConfig

OrderRule = Callable[[StepConfig, StepConfig], str | None]
INT8_BEFORE_TRAINING = ("activation quantization replaces layers with inference kernels that cannot train; run "
                        "distill/lora before it")


def _weights_changed_after_final(earlier: StepConfig, later: StepConfig) -> str | None:
    return earlier.weight_changes_refusal() if later.traits.changes_weights else None


def _float_weights_needed_after_packing(earlier: StepConfig, later: StepConfig) -> str | None:
    packed = earlier.traits.packs_weights and _whole_model(earlier)
    return later.traits.before_packing if packed and _whole_model(later) else None


def _training_after_int8(earlier: StepConfig, later: StepConfig) -> str | None:
    return INT8_BEFORE_TRAINING if earlier.traits.quantizes_activations and later.traits.trains else None


def _whole_model(step: StepConfig) -> bool:
    # Narrower targets may not overlap: then the step itself checks the modules it selects at run time.
    return "*" in step.targets


RULES: tuple[OrderRule, ...] = (_weights_changed_after_final, _float_weights_needed_after_packing,
                                _training_after_int8)


def check_order(steps: Sequence[StepConfig]) -> None:
    """Raise ValueError naming the first pair of steps in an order that cannot work, and how to fix it."""
    for later_index, later in enumerate(steps):
        for earlier_index, earlier in enumerate(steps[:later_index]):
            for rule in RULES:
                reason = rule(earlier, later)
                if reason is not None:
                    raise ValueError(f"step {later_index} ({later.tag()}) cannot follow step {earlier_index} "
                                     f"({earlier.tag()}): {reason}")

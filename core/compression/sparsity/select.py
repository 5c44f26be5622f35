"""Which modules a step touches: fnmatch `targets`/`exclude` on module names, by module type."""

from fnmatch import fnmatchcase

from torch import nn

from core.compression.configs.base import StepConfig
from core.compression.state import ModelState
from core.errors import InvalidSpec


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def select_modules(state: ModelState, config: StepConfig, kinds: tuple[type[nn.Module], ...],
                   skip_tied: bool = True) -> dict[str, nn.Module]:
    """Modules of `kinds` matching a target and no exclude pattern. With `skip_tied`, a Linear whose weight is
    shared with an embedding (a tied LM head) is left out: changing it would change the embedding too."""
    embedded = {id(m.weight) for m in state.model.modules() if isinstance(m, nn.Embedding)}
    selected = {
        name: module
        for name, module in state.model.named_modules()
        if isinstance(module, kinds) and matches(name, config.targets) and not matches(name, config.exclude)
        and not (skip_tied and isinstance(module, nn.Linear) and id(module.weight) in embedded)
    }
    if not selected:
        kind_names = " or ".join(kind.__name__ for kind in kinds)
        raise InvalidSpec(
            f"{config.type}: targets {config.targets} minus exclude {config.exclude} select no {kind_names} module",
            details={"targets": config.targets, "exclude": config.exclude},
        )
    return selected


def refuse_encoded(state: ModelState, names: list[str], step: str) -> None:
    """A step that rewrites weights cannot run after a step that already packed them (the packing would be stale)."""
    encoded = [name for name in names if name in state.encodings]
    if encoded:
        raise InvalidSpec(
            f"{step} must run before the steps that packed {encoded[0]} (and {len(encoded) - 1} more); "
            "reorder the recipe",
            details={"encoded": encoded[:20]},
        )

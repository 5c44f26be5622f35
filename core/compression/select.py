"""The one resolver of a step's `targets`/`exclude`: fnmatch patterns on module names (quanto's include/exclude,
llm-compressor's targets/ignore), used by every step.

A tied weight (one Parameter used by several modules, e.g. an LM head sharing the input embedding) is handled as
the step asks: `tied="shared"` selects every matching module and `Selection.shared_weights` groups them, so the
weight is changed once for all its users; `tied="skipped"` leaves out each module whose weight another module also
uses and names it in `Selection.skipped` (changing the tensor would change the other module too).
"""

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Generic, Literal, TypeVar

from torch import nn

from core.compression.configs.base import StepConfig
from core.compression.state import ModelState
from core.errors import InvalidSpec

Tied = Literal["shared", "skipped"]
M = TypeVar("M", bound=nn.Module)


@dataclass
class SharedWeight:
    """One weight tensor and every module that uses it (more than one when embeddings are tied)."""

    name: str
    weight: nn.Parameter
    modules: list[str]


@dataclass
class Selection(Generic[M]):
    """The selected modules by name, in model order, and the matching ones left out because their weight is tied."""

    modules: dict[str, M]
    skipped: list[str] = field(default_factory=list)
    users: dict[int, list[str]] = field(default_factory=dict, repr=False)  # weight id -> every module using it

    def shared_weights(self) -> list[SharedWeight]:
        """The selected modules grouped by weight, named after the first one: a tied weight appears once, with every
        module that uses it, selected or not (changing a tied embedding also changes the LM head sharing it)."""
        by_identity: dict[int, SharedWeight] = {}
        for name, module in self.modules.items():
            key = id(module.weight)
            by_identity.setdefault(key, SharedWeight(f"{name}.weight", module.weight, self.users[key]))
        return list(by_identity.values())


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def is_selected(name: str, config: StepConfig) -> bool:
    """Whether `name` matches one of the config's `targets` and none of its `exclude` patterns."""
    return _matches(name, config.targets) and not _matches(name, config.exclude)


def _named(name: str, patterns: list[str]) -> bool:
    """Whether a pattern names `name` rather than matching everything (`*`)."""
    return any(fnmatchcase(name, pattern) and pattern.strip("*?") for pattern in patterns)


def held_back(model: nn.Module, config: StepConfig) -> list[str]:
    """The modules a step leaves alone unless its recipe names them: a generative model's output head (`lm_head`)
    and the input embedding tied to it, as llm-compressor's schemes leave them. Quantizing SmolLM2's tied
    embedding and head to 4 bits took its perplexity from 1.15x to 1.70x fp32 (issue 19). Named means a `targets`
    pattern other than a bare wildcard matches it (`"lm_head"`), or, for the embedding, `include_embeddings` set
    in the recipe (not its default)."""
    can_generate, output_head = getattr(model, "can_generate", None), getattr(model, "get_output_embeddings", None)
    generative = callable(can_generate) and callable(output_head) and can_generate()
    head = output_head() if generative and callable(output_head) else None
    if not isinstance(head, nn.Module) or not isinstance(getattr(head, "weight", None), nn.Parameter):
        return []
    names = [name for name, module in model.named_modules()
             if module is head or getattr(module, "weight", None) is head.weight]
    embeddings_asked = "include_embeddings" in config.model_fields_set and getattr(config, "include_embeddings", False)
    named = [name for name in names if _named(name, config.targets)
             or (embeddings_asked and isinstance(model.get_submodule(name), nn.Embedding))]
    return [] if named else names


def held_back_note(model: nn.Module, config: StepConfig) -> str | None:
    """What a step left alone by default (`held_back`) and how to include it, for the step's notes; None when the
    step left nothing out that its patterns match."""
    names = [name for name in held_back(model, config) if is_selected(name, config)]
    if not names:
        return None
    return (f"left as they were: {' and '.join(names)} (a generative model's output head, and an embedding tied to "
            "it, are kept unless the recipe names them, as llm-compressor's schemes keep them: they cost the most "
            'quality per byte saved); to include them add "lm_head" to targets (and include_embeddings for a '
            "tied embedding)")


def select_modules(model: nn.Module, config: StepConfig, kinds: tuple[type[M], ...], *,
                   tied: Tied) -> Selection[M]:
    """Modules of `kinds` whose name `is_selected`, tied ones shared or skipped.

    Raises InvalidSpec when nothing is selected, so a typo in a pattern never silently compresses nothing.
    Example: `select_modules(model, config, (nn.Linear,), tied="skipped").modules`.
    """
    users = _weight_users(model)
    kept = set(held_back(model, config))
    matching = {name: module for name, module in model.named_modules()
                if isinstance(module, kinds) and is_selected(name, config) and name not in kept}
    skipped = [name for name, module in matching.items()
               if tied == "skipped" and len(users.get(id(module.weight), [])) > 1]
    selection = Selection({name: m for name, m in matching.items() if name not in skipped}, skipped, users)
    if not selection.modules:
        untied = "untied " if tied == "skipped" else ""
        raise nothing_selected(config, untied + " or ".join(f"nn.{kind.__name__}" for kind in kinds) + " module")
    return selection


def nothing_selected(config: StepConfig, what: str) -> InvalidSpec:
    """The error for patterns that select nothing: it names the patterns, so a typo is easy to spot."""
    return InvalidSpec(f"{config.type}: targets {config.targets} minus exclude {config.exclude} select no {what}",
                       details={"targets": config.targets, "exclude": config.exclude})


def refuse_encoded(state: ModelState, names: list[str], step: str) -> None:
    """A step that rewrites weights cannot run after a step that already packed them (the packing would be stale)."""
    encoded = [name for name in names if name in state.encodings]
    if encoded:
        raise InvalidSpec(
            f"{step} must run before the steps that packed {encoded[0]} (and {len(encoded) - 1} more); "
            "reorder the recipe",
            details={"encoded": encoded[:20]},
        )


def _weight_users(model: nn.Module) -> dict[int, list[str]]:
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            users.setdefault(id(weight), []).append(name)
    return users

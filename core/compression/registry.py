"""The one table from step config type to the handler that applies it (torchao's config registry pattern)."""

import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from core.compression.spec import StepConfig
from core.errors import InvalidSpec

if TYPE_CHECKING:
    from core.compression.state import ModelState, StepContext, StepReport

C = TypeVar("C", bound=StepConfig)
Handler = Callable[["ModelState", C, "StepContext"], "StepReport"]

_HANDLERS: dict[type[StepConfig], Handler] = {}


def register_step(config_type: type[C]) -> Callable[[Handler[C]], Handler[C]]:
    """Decorator: `@register_step(QuantizeRTN)` makes the function the handler for that config type."""

    def decorate(handler: Handler[C]) -> Handler[C]:
        if config_type in _HANDLERS:
            raise RuntimeError(f"a handler for {config_type.__name__} is already registered")
        _HANDLERS[config_type] = handler
        return handler

    return decorate


def handler_for(config: StepConfig) -> Handler:
    load_step_modules()
    try:
        return _HANDLERS[type(config)]
    except KeyError:
        raise InvalidSpec(f"no handler is registered for step {type(config).__name__}") from None


def load_step_modules() -> None:
    """Import every module of core.compression.steps once: their @register_step decorators fill the table."""
    import core.compression.steps as steps

    for module in pkgutil.iter_modules(steps.__path__):
        importlib.import_module(f"{steps.__name__}.{module.name}")

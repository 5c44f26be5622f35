"""Model compression: the pure library (`core.compression`: recipes, steps, pipeline, metrics, model I/O, the
artifact format and exports) and the service built on it (`core.service`: settings, database, storage, uploads, job
submission). `core.errors` is the one error tree both raise.

`import core` stays light (no torch); `core.load_compressed(path)` imports the heavy machinery on first use.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def load_compressed(path: Path | str, dtype: Any = None) -> "PreTrainedModel":
    """Load a compressed artifact folder or .zip into a transformers model in eval mode (core.compression.artifact),
    its float weights in `dtype` (a torch dtype; float32 when None), e.g. `torch.bfloat16` for a big model."""
    from core.compression.artifact import load_compressed as load

    return load(path) if dtype is None else load(path, dtype=dtype)
__version__ = "0.1.0"

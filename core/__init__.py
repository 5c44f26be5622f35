"""Model compression library: recipes, steps, metrics and the compressed artifact format.

`import core` stays light (no torch); `core.load_compressed(path)` imports the heavy machinery on first use.
"""

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def load_compressed(path: Path | str) -> "PreTrainedModel":
    """Load a compressed artifact folder or .zip into a transformers model in eval mode (see core.compressed)."""
    from core.compressed import load_compressed as load

    return load(path)
__version__ = "0.1.0"

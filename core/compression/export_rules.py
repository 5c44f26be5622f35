"""Which recipes an export format can represent, checked at submission (JobSpec validation): a recipe whose
artifact an export cannot write is refused with the reason, instead of failing (or silently losing a step) at the
end of the job. Each config answers for every format through its traits (`StepConfig.export_refusal`).
"""

from collections.abc import Sequence

from core.compression.configs.base import COMPRESSED_TENSORS, EXPORT_FORMATS, ONNX, ExportFormat, StepConfig

__all__ = ["COMPRESSED_TENSORS", "EXPORT_FORMATS", "ONNX", "check_exports"]


def check_exports(steps: Sequence[StepConfig], export: Sequence[ExportFormat]) -> None:
    """Raise ValueError naming the first step that an export format in `export` cannot represent, and why."""
    for fmt in export:
        for index, step in enumerate(steps):
            reason = step.export_refusal(fmt)
            if reason is not None:
                raise ValueError(f'export "{fmt}" cannot represent step {index} ({step.tag()}): {reason}')

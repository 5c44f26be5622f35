from fastapi import APIRouter

from api.deps import V1_DEPENDENCIES
from api.errors import V1_ERRORS
from api.schemas import PresetOut
from core.compression.presets import PRESETS

router = APIRouter(prefix="/v1/presets", tags=["presets"], responses=V1_ERRORS, dependencies=V1_DEPENDENCIES)


@router.get("", response_model=list[PresetOut])
def list_presets() -> list[PresetOut]:
    """The named recipes a job can ask for with `"preset": NAME` (and `overrides`), with what the benchmarks
    measured with each."""
    return [PresetOut(name=p.name, summary=p.summary, steps=p.steps, export=p.export, measured=p.measured)
            for p in PRESETS.values()]

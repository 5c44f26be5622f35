"""Safe reading of Hugging Face model folders: configs are parsed as data, weights only from safetensors.

Nothing here ever unpickles or runs code shipped with a model: `trust_remote_code` is always False, `auto_map`
entries are dropped, and the architecture must be a class that transformers itself defines.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import CONFIG_MAPPING, PretrainedConfig, PreTrainedModel

from core.errors import UnsafeInput, UnsupportedModel
from core.safetensors_check import check_safetensors

MAX_CONFIG_BYTES = 1024 * 1024
# Config integers that size or repeat modules. Caps keep a hostile config from hanging or allocating while the
# model is built on the meta device (10^5 layers take minutes there); the parameter quota does the rest.
SIZE_KEY = re.compile(r"^(num_|n_)|_(size|dim|layers?|heads|experts|positions|embeddings)$")
BLOCK_KEY = re.compile(r"(layers?|experts|blocks)$")
MAX_DIMENSION = 1 << 24
MAX_BLOCKS = 1024
PICKLE_WEIGHTS = ("pytorch_model.bin", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    model_type: str
    num_parameters: int
    weight_bytes: int


def read_config(folder: Path) -> PretrainedConfig:
    """Parse `config.json` as plain data and build the transformers config class for its `model_type`."""
    raw = _config_dict(folder)
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UnsupportedModel(f"config.json: model_type {model_type!r} is not an architecture transformers knows")
    raw.pop("auto_map", None)  # custom code is never used, so its pointers are dropped
    for key in [k for k in raw if k.startswith("_attn_implementation")]:
        raw.pop(key)
    check_dimensions(raw)
    try:
        return CONFIG_MAPPING[model_type].from_dict(raw)
    except Exception as exc:  # transformers' own validation raises several unrelated types; all are user faults
        raise UnsupportedModel(f"config.json: invalid {model_type} config: {exc}") from exc


def check_dimensions(raw: dict[str, Any]) -> None:
    """Every size or count (nested sub-configs included) must be a non-negative integer under its cap."""
    pending: list[Any] = [raw]
    while pending:  # iterative: a deeply nested config must not exhaust the stack here
        node = pending.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if isinstance(value, dict | list):
                pending.append(value)
            elif isinstance(key, str) and SIZE_KEY.search(key) and not isinstance(value, bool | None):
                _check_dimension(key, value)  # flags such as tie_word_embeddings match the name but not the type


def _check_dimension(key: str, value: Any) -> None:
    if not isinstance(value, int):
        raise UnsupportedModel(f"config.json: {key} must be an integer, not {value!r}", {"field": key})
    limit = MAX_BLOCKS if BLOCK_KEY.search(key) else MAX_DIMENSION
    if not 0 <= value <= limit:
        raise UnsupportedModel(f"config.json: {key} = {value} is outside 0..{limit:,}", {"field": key})


def model_class_for(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers class named in `config.architectures`, or the base model class for the model type."""
    names = config.architectures or []
    if not names:
        return transformers.AutoModel._model_mapping[type(config)]
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise UnsupportedModel(f"config.json: architecture {names[0]!r} is not a transformers model class")
    return cls


def inspect_model_folder(folder: Path, max_parameters: int) -> ModelInfo:
    """Validate an uploaded folder without allocating its weights (parameters are counted on the meta device)."""
    weights = safetensors_files(folder)
    for file in weights:
        check_safetensors(file)
    config = read_config(folder)
    cls = model_class_for(config)
    num_parameters = count_parameters_on_meta(cls, config)
    if num_parameters > max_parameters:
        raise UnsupportedModel(
            f"config.json describes {num_parameters:,} parameters; the limit is {max_parameters:,}"
        )
    return ModelInfo(
        architecture=cls.__name__,
        model_type=config.model_type,
        num_parameters=num_parameters,
        weight_bytes=sum(f.stat().st_size for f in weights),
    )


def count_parameters_on_meta(cls: type[PreTrainedModel], config: PretrainedConfig) -> int:
    """Build the model on the meta device (no memory for weights) and count its parameters."""
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in cls(config).parameters())
    except Exception as exc:  # a config transformers accepts can still describe an impossible model
        raise UnsupportedModel(f"config.json: cannot build {cls.__name__} from it: {exc}") from exc


def load_model(folder: Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load an original (uncompressed) model folder in eval mode, fp32, from safetensors only, offline."""
    config = read_config(folder)
    safetensors_files(folder)
    model = model_class_for(config).from_pretrained(
        folder,
        config=config,
        local_files_only=True,
        trust_remote_code=False,
        use_safetensors=True,
        dtype=torch.float32,
    )
    return model.to(device).eval()


def safetensors_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern)]
        if pickled:
            raise UnsafeInput(
                f"weights must be safetensors; found only {', '.join(sorted(set(pickled)))}, which would need "
                "unpickling. Convert with `model.save_pretrained(dir, safe_serialization=True)`."
            )
        raise UnsupportedModel("no *.safetensors weight file found next to config.json")
    return files


def _config_dict(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise UnsupportedModel("config.json is missing at the top of the model folder")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UnsafeInput(f"config.json is {path.stat().st_size:,} bytes; the limit is {MAX_CONFIG_BYTES:,}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UnsupportedModel(f"config.json is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise UnsupportedModel("config.json must hold a JSON object")
    return raw

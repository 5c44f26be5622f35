"""Safe reading of Hugging Face model folders: configs are parsed as data, weights only from safetensors.

Nothing here ever unpickles or runs code shipped with a model: `trust_remote_code` is always False, `auto_map`
entries are dropped, and the architecture must be a class that transformers itself defines. Every file a folder
names (the shards of its index, tokenizer files in tokenizer_config.json, `transformers_weights`, ...) must be a
plain file name of a regular file inside the folder. Weights are read by safetensors from the files resolved here and
handed to transformers as a state dict: transformers never gets a file name, so it cannot be steered to another
model's folder or to `torch.load`.
"""

import json
import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from core.compression.estimate import BlockShape, ModelFacts, block_shape
from core.compression.safetensors_check import FLOAT_DTYPES, check_safetensors
from core.errors import ServiceError, UnsafeInput, UnsupportedModel

MAX_CONFIG_BYTES = 1024 * 1024
MAX_LISTING_BYTES = 16 * 1024**2  # an index of 100,000 tensors (the safetensors cap) is ~8 MB; so are huge vocabularies
# Config integers that size or repeat modules. Caps keep a hostile config from hanging or allocating while the
# model is built on the meta device (10^5 layers take minutes there); the parameter quota does the rest.
SIZE_KEY = re.compile(r"^(num_|n_)|_(size|dim|layers?|heads|experts|positions|embeddings)$")
BLOCK_KEY = re.compile(r"(layers?|experts|blocks)$")
MAX_DIMENSION = 1 << 24
MAX_BLOCKS = 1024
PICKLE_WEIGHTS = ("pytorch_model.bin", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
# The JSON files transformers reads from a model folder, with their size caps: any of them may name other files.
NAMING_FILES = {"config.json": MAX_CONFIG_BYTES, GENERATION_CONFIG: MAX_CONFIG_BYTES,
                "tokenizer_config.json": MAX_LISTING_BYTES, "special_tokens_map.json": MAX_CONFIG_BYTES}
PATH_KEY = re.compile(r"(^|_)(file|files|filename|path|paths|dir|directory|folder)$")
WEIGHT_KEYS = frozenset({"transformers_weights", "gguf_file"})
# Labels, never opened: transformers overwrites `_name_or_path` with the folder it loads from, and a model converted
# from GGUF keeps the GGUF's own name under `_model_name_or_path` (SmolLM2: "Smollm2 135M 8k Lc100K Mix1 Ep2").
LABEL_KEYS = frozenset({"_name_or_path", "name_or_path", "_model_name_or_path"})
TOKENIZER_FILES = ("tokenizer*.json", "vocab*", "merges.txt", "*.model", "special_tokens_map.json", "added_tokens.json")


@dataclass(frozen=True)
class ModelInfo:
    architecture: str
    model_type: str
    num_parameters: int
    weight_bytes: int
    block_shape: BlockShape | None = None

    def facts(self) -> ModelFacts:
        """What the pre-flight estimate reads of this model."""
        return ModelFacts(self.num_parameters, self.weight_bytes, blocks=self.block_shape)


def inspect_model_folder(folder: Path, max_parameters: int) -> ModelInfo:
    """Validate an uploaded folder for everything a job will read from it, without allocating its weights: the
    safetensors files (and the index naming them), the files configs name, config.json, the parameter count (on
    the meta device), that the weights cover every parameter, the tokenizer and the generation config."""
    weights = weight_files(folder)
    tensors = _checked_tensors(weights)
    check_named_files(folder)
    config = read_model_config(folder)
    cls = model_class_for(config)
    model = meta_model(cls, config)
    num_parameters = sum(p.numel() for p in model.parameters())
    if num_parameters > max_parameters:
        raise UnsupportedModel(
            f"config.json describes {num_parameters:,} parameters; the limit is {max_parameters:,}"
        )
    check_weight_coverage(cls, config, tensors)
    _check_vocabulary(load_tokenizer(folder, config), model)
    read_generation_config(folder)
    return ModelInfo(
        architecture=cls.__name__,
        model_type=config.model_type,
        num_parameters=num_parameters,
        weight_bytes=sum(f.stat().st_size for f in weights),
        block_shape=block_shape(model),
    )


def load_model(folder: Path, device: str | torch.device = "cpu") -> PreTrainedModel:
    """Load an original (uncompressed) model folder in eval mode, fp32, from safetensors only, offline.

    The folder is checked again as at upload (one changed since must be refused, not read): weights come only from
    the files `weight_files` resolves, and must still cover every parameter."""
    files = weight_files(folder)
    check_named_files(folder)
    config = read_model_config(folder)
    cls = model_class_for(config)
    state_dict = read_state_dict(files)
    check_weight_coverage(cls, config, {name: tensor.to("meta") for name, tensor in state_dict.items()})
    model = _from_state_dict(cls, config, state_dict)
    generation_config = read_generation_config(folder)
    if generation_config is not None and model.can_generate():
        model.generation_config = generation_config
    return model.to(device).eval()


def load_tokenizer(folder: Path, config: PretrainedConfig) -> PreTrainedTokenizerBase | None:
    """The folder's tokenizer, built offline without remote code (the files its configs name checked first), or
    None when the folder ships no tokenizer files; UnsupportedModel when its files do not make a tokenizer."""
    if not any(next(folder.glob(pattern), None) for pattern in TOKENIZER_FILES):
        return None
    check_named_files(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, config=config, local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # tokenizer classes raise many unrelated types (KeyError, TypeError, ...) on bad files
        raise UnsupportedModel(f"the tokenizer files do not make a tokenizer: {exc!r}") from exc


def read_generation_config(folder: Path) -> GenerationConfig | None:
    """The folder's generation_config.json as transformers loads it, or None without one; UnsupportedModel when
    it is not a valid generation config."""
    if not _present(folder / GENERATION_CONFIG):
        return None
    read_json_file(model_file(folder, GENERATION_CONFIG, "the model folder"), MAX_CONFIG_BYTES)
    try:
        generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
        generation_config.validate()
    except Exception as exc:  # wrong value types surface as TypeError or ValueError from deep inside transformers
        raise UnsupportedModel(f"{GENERATION_CONFIG} is invalid: {exc!r}") from exc
    return generation_config


def read_config(folder: Path) -> PretrainedConfig:
    """Parse `config.json` as plain data and build the transformers config class for its `model_type`."""
    return _build_config(_config_dict(folder))


def read_model_config(folder: Path) -> PretrainedConfig:
    """`read_config` for an uploaded (original) model, which must be an unquantized float checkpoint: any
    `quantization_config` is refused, as transformers would hand it to a quantizer the service never runs."""
    raw = _config_dict(folder)
    if any(key == "quantization_config" and value is not None for key, value in _json_items(raw)):
        raise UnsupportedModel("config.json has a quantization_config: only unquantized float checkpoints can be "
                               "compressed; upload the original weights", {"field": "quantization_config"})
    return _build_config(raw)


def _build_config(raw: dict[str, Any]) -> PretrainedConfig:
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
    for key, value in _json_items(raw):
        # flags such as tie_word_embeddings match the name but not the type
        if isinstance(key, str) and SIZE_KEY.search(key) and not isinstance(value, bool | dict | list | None):
            _check_dimension(key, value)


def _check_dimension(key: str, value: Any) -> None:
    if not isinstance(value, int):
        raise UnsupportedModel(f"config.json: {key} must be an integer, not {value!r}", {"field": key})
    limit = MAX_BLOCKS if BLOCK_KEY.search(key) else MAX_DIMENSION
    if not 0 <= value <= limit:
        raise UnsupportedModel(f"config.json: {key} = {value} is outside 0..{limit:,}", {"field": key})


def _json_items(node: Any) -> Iterator[tuple[Any, Any]]:
    """Every (key or index, value) pair of parsed JSON, nested ones included. Iterative: the depth is the user's."""
    pending = [node]
    while pending:
        current = pending.pop()
        if isinstance(current, dict | list):
            for key, value in current.items() if isinstance(current, dict) else enumerate(current):
                pending.append(value)
                yield key, value


def model_class_for(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The transformers class named in `config.architectures`, or the base model class for the model type."""
    names = config.architectures or []
    if not names:
        return transformers.AutoModel._model_mapping[type(config)]
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise UnsupportedModel(f"config.json: architecture {names[0]!r} is not a transformers model class")
    # A few classes read extra files in their own from_pretrained (Qwen2.5-Omni torch.loads spk_dict.pt).
    if cls.from_pretrained.__func__ is not PreTrainedModel.from_pretrained.__func__:  # type: ignore[attr-defined]
        raise UnsupportedModel(f"config.json: {names[0]} loads extra files of its own; it is not supported")
    return cls


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device as they are registered (before any
    initialisation touches them), while buffers stay real: the meta device for everything (`torch.device("meta")`)
    would leave the rotary tables, which are computed in __init__ and never stored, without values.
    accelerate's `init_empty_weights(include_buffers=False)` does the same; it is not a dependency of ours."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:  # a meta one is kept as it is: tying shares it by identity
            module._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def meta_model(cls: type[PreTrainedModel], config: PretrainedConfig) -> PreTrainedModel:
    """The model built on the meta device: its parameters' names and shapes, with no memory for weights."""
    try:
        with torch.device("meta"):
            return cls(config)
    except Exception as exc:  # a config transformers accepts can still describe an impossible model
        raise UnsupportedModel(f"config.json: cannot build {cls.__name__} from it: {exc}") from exc


def check_weight_coverage(cls: type[PreTrainedModel], config: PretrainedConfig,
                          tensors: Mapping[str, torch.Tensor]) -> None:
    """Every parameter `config` implies must load from a stored float tensor of its shape; otherwise transformers
    fills it with random values and a job "succeeds" on noise. Tied weights are stored once and buffers need not be
    stored. Names are matched by transformers' own loader, with its renames (a BertFor* checkpoint's `bert.` prefix
    when loaded as BertModel), on the meta device: `tensors` may be meta tensors and nothing is allocated."""
    floats = {name: tensor for name, tensor in tensors.items() if tensor.is_floating_point()}
    missing, wrong_shape = _unloaded_parameters(cls, config, floats)
    not_float: set[str] = set()
    if missing and len(floats) < len(tensors):  # what the non-float tensors would fill is stored, but as integers
        not_float = missing - _unloaded_parameters(cls, config, tensors)[0]
    problems = {"missing": sorted(missing - not_float), "not a float tensor": sorted(not_float),
                "wrong shape": wrong_shape}
    found = {label: names for label, names in problems.items() if names}
    if found:
        summary = "; ".join(f"{label}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
                            for label, names in found.items())
        raise UnsupportedModel(f"the weights do not cover the model config.json describes ({summary}); transformers "
                               "would fill these with random values", {k: v[:20] for k, v in found.items()})


def _unloaded_parameters(cls: type[PreTrainedModel], config: PretrainedConfig,
                         tensors: Mapping[str, torch.Tensor]) -> tuple[set[str], list[str]]:
    """Parameters transformers' loader leaves missing, and those stored with another shape, when it loads
    `tensors` into `cls(config)` on the meta device."""
    try:
        loaded = cls.from_pretrained(None, config=config, state_dict=dict(tensors), device_map="meta",
                                     dtype=torch.float32, ignore_mismatched_sizes=True, output_loading_info=True)
    except Exception as exc:  # the loader's key conversions raise several unrelated types on tensors they cannot use
        raise UnsupportedModel(f"the weights cannot be loaded into {cls.__name__}: {exc}") from exc
    model, info = cast(tuple[PreTrainedModel, dict[str, Any]], loaded)
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    wrong_shape = sorted(f"{name} (stored {list(stored)}, expected {list(expected)})"
                         for name, stored, expected in info["mismatched_keys"] if name in parameters)
    return set(info["missing_keys"]) & parameters, wrong_shape


def _from_state_dict(cls: type[PreTrainedModel], config: PretrainedConfig,
                     state_dict: dict[str, torch.Tensor]) -> PreTrainedModel:
    try:
        return cls.from_pretrained(None, config=config, state_dict=state_dict, dtype=torch.float32)
    except (RuntimeError, ValueError) as exc:
        raise UnsupportedModel(f"the weights do not load into {cls.__name__}: {exc}") from exc


def _check_vocabulary(tokenizer: PreTrainedTokenizerBase | None, model: PreTrainedModel) -> None:
    """Token ids past the input embeddings would index outside them on the first forward pass."""
    if tokenizer is None:
        return
    try:
        embeddings = model.get_input_embeddings()
    except NotImplementedError:  # no token embeddings: no id can overflow them
        return
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise UnsupportedModel(f"the tokenizer has {len(tokenizer):,} tokens but the input embeddings have only "
                               f"{rows:,} rows (config.json vocab_size)", {"field": "vocab_size"})


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files the weights load from: model.safetensors, else the shards its index names (the index
    is checked whenever present). Each must be a plain `*.safetensors` name of a regular file in `folder`: an
    entry such as `../<another model>/model.safetensors`, `/etc/passwd` or `shard.bin` is UnsafeInput."""
    shards = _index_shards(folder) if _present(folder / WEIGHTS_INDEX) else []
    if _present(folder / SINGLE_WEIGHTS):
        return [model_file(folder, SINGLE_WEIGHTS, "the model folder")]
    if shards:
        return shards
    raise _no_weights(folder)


def _index_shards(folder: Path) -> list[Path]:
    index = read_json_file(model_file(folder, WEIGHTS_INDEX, "the model folder"), MAX_LISTING_BYTES)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise UnsupportedModel(f"{WEIGHTS_INDEX}: weight_map must map tensor names to shard file names")
    names = list(weight_map.values())
    if not all(isinstance(name, str) for name in names):
        raise UnsupportedModel(f"{WEIGHTS_INDEX}: weight_map values must be shard file names")
    return [_shard(folder, name) for name in sorted(set(names))]


def _shard(folder: Path, name: str) -> Path:
    path = model_file(folder, name, WEIGHTS_INDEX)
    if not name.endswith(".safetensors"):
        raise UnsafeInput(f"{WEIGHTS_INDEX}: {name!r} is not a *.safetensors file; weights in any other format "
                          "would be unpickled")
    return path


def _no_weights(folder: Path) -> ServiceError:
    pickled = sorted({p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern)})
    if pickled:
        return UnsafeInput(
            f"weights must be safetensors; found only {', '.join(pickled)}, which would need "
            "unpickling. Convert with `model.save_pretrained(dir, safe_serialization=True)`."
        )
    return UnsupportedModel(f"no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX} found next to config.json")


def model_file(folder: Path, name: Any, source: str) -> Path:
    """`folder / name` when `name` (read from `source`) is a plain file name of a regular file in `folder`.
    Anything that could lead elsewhere (a folder, `..`, an absolute path, a link) is UnsafeInput; an absent file
    is UnsupportedModel."""
    if not plain_file_name(name):
        raise UnsafeInput(f"{source}: {str(name)[:200]!r} is not a plain file name inside the model folder "
                          "(no folders, '..' or absolute paths)")
    path = folder / name
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UnsafeInput(f"{source}: {name!r} is a link or not a regular file", {"file": name})
    if not path.is_file():
        raise UnsupportedModel(f"{source}: {name!r} is missing from the model folder", {"file": name})
    return path


def plain_file_name(name: Any) -> bool:
    """The one rule for a file a model folder names (index, configs, chunked uploads): one printable name, no
    folders, `..`, drive or control characters."""
    # isprintable() also rules out NUL and lone surrogates, which the filesystem calls would raise on.
    return (isinstance(name, str) and name.isprintable() and 0 < len(name.encode()) <= 255
            and name not in (".", "..") and not any(c in name for c in "/\\:"))


def _present(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def check_named_files(folder: Path) -> None:
    """Every file a JSON config of the folder names must pass `model_file`, and a weights entry
    (`transformers_weights`, `gguf_file`) must name what the loader reads: nothing a job reads lies outside its
    model folder, whichever file transformers would open for such a key."""
    for file_name, limit in NAMING_FILES.items():
        if _present(folder / file_name):
            raw = read_json_file(model_file(folder, file_name, "the model folder"), limit)
            for key, value in _json_items(raw):
                if isinstance(key, str) and (key in WEIGHT_KEYS or (PATH_KEY.search(key) and key not in LABEL_KEYS)):
                    _check_named(folder, f"{file_name}: {key}", key, value)


def _check_named(folder: Path, source: str, key: str, value: Any) -> None:
    names = [value] if isinstance(value, str) else [v for _, v in _json_items(value) if isinstance(v, str)]
    for name in names:
        model_file(folder, name, source)
        if key in WEIGHT_KEYS and name not in (SINGLE_WEIGHTS, WEIGHTS_INDEX):
            raise UnsafeInput(f"{source}: {name!r}: weights load only from {SINGLE_WEIGHTS} or the shards of "
                              f"{WEIGHTS_INDEX}", {"field": key})


def read_json_file(path: Path, limit: int) -> dict[str, Any]:
    """The JSON object in `path`, at most `limit` bytes, parsed strictly: NaN, Infinity and numbers too large for a
    float are refused (Python's json accepts them; no config means one), and so are integers over Python's
    4,300-digit limit. UnsafeInput when too large, UnsupportedModel when not such an object."""
    size = path.stat().st_size
    if size > limit:
        raise UnsafeInput(f"{path.name} is {size:,} bytes; the limit is {limit:,}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant, parse_float=_finite)
    except (ValueError, RecursionError) as exc:  # ValueError covers bad UTF-8, bad JSON and over-long integers
        raise UnsupportedModel(f"{path.name} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise UnsupportedModel(f"{path.name} must hold a JSON object")
    return raw


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:50]} is out of the range of a float")
    return value


def _config_dict(folder: Path) -> dict[str, Any]:
    if not _present(folder / "config.json"):
        raise UnsupportedModel("config.json is missing at the top of the model folder")
    return read_json_file(model_file(folder, "config.json", "the model folder"), MAX_CONFIG_BYTES)


def _checked_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """`check_safetensors` on every file; the tensors they hold, as meta tensors of their shapes (float or not)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        entries = check_safetensors(file)
        _merge(tensors, {name: _meta_tensor(entry) for name, entry in entries.items()}, file)
    return tensors


def _meta_tensor(entry: dict[str, Any]) -> torch.Tensor:
    dtype = torch.float32 if entry["dtype"] in FLOAT_DTYPES else torch.int64
    return torch.empty(entry["shape"], dtype=dtype, device="meta")


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """The tensors of `files`, read by safetensors (nothing is unpickled); a name stored in two files is refused."""
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            tensors = load_file(file)
        except (OSError, SafetensorError) as exc:
            raise UnsafeInput(f"{file.name} is not a valid safetensors file: {exc}", {"file": file.name}) from exc
        _merge(state_dict, tensors, file)
    return state_dict


def _merge(tensors: dict[str, torch.Tensor], more: Mapping[str, torch.Tensor], file: Path) -> None:
    twice = sorted(tensors.keys() & more.keys())
    if twice:
        raise UnsupportedModel(f"{file.name} stores {twice[0]!r}, which another shard stores too", {"file": file.name})
    tensors.update(more)

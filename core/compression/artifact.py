"""The compressed artifact: a Hugging Face-style folder whose safetensors file holds packed weights.

    config.json (+ generation_config.json)  the model config, `architectures` naming the class to rebuild
    model.safetensors                        `<param>.qweight`, `<param>.scale`, ... for each encoded parameter,
                                             the plain tensor for every other state_dict entry, shared ones once;
                                             or shards named by model.safetensors.index.json (the streaming
                                             engine, `core.compression.sequential`, writes those)
    compression.json                         the job's manifest + format_version, encodings, aliases, versions
    tokenizer files                          copied from the original folder

`load_compressed` rebuilds the transformers model from this folder (or a .zip of it) with safetensors and JSON
only: nothing is unpickled and no code shipped with a model runs. Encoded weights are decoded to float on load.
"""

import copy
import dataclasses
import json
import shutil
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import safetensors
import torch
import transformers
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from core.compression.archive import ARTIFACT_LIMITS, ExtractionLimits, extract_archive
from core.compression.encoding import decode
from core.compression.modelio import model_class_for, model_file, parameters_on_meta, read_config, weight_files
from core.compression.rewrites import replay
from core.compression.state import Encoding, ModelState, Rewrite
from core.errors import UnsupportedModel

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "compression.json"
ARTIFACT = "the compressed artifact"
TOKENIZER_PATTERNS = (
    "tokenizer*.json",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "*.model",
)
# Never passed on even when a tokenizer pattern matches: these would be unpickled or executed by some loader.
UNSAFE_SUFFIXES = frozenset({".bin", ".py", ".pkl", ".pickle", ".pt", ".pth", ".ckpt"})


class _EncodingRecord(BaseModel):
    format: str
    meta: dict[str, Any]
    tensors: list[str]


class _RewriteRecord(BaseModel):
    kind: str
    module: str
    meta: dict[str, Any]


class _Manifest(BaseModel):
    """The part of compression.json the loader relies on; the job's own manifest fields ride along."""

    model_config = ConfigDict(extra="allow")

    format_version: Literal[1]
    encodings: dict[str, _EncodingRecord]
    aliases: dict[str, str]
    rewrites: list[_RewriteRecord] = []


def save_compressed(
    state: ModelState, out_dir: Path, manifest: Mapping[str, Any], source_dir: Path | None = None
) -> Path:
    """Write `state` as a compressed artifact folder `out_dir` and return it.

    `manifest` (e.g. job id, recipe, metrics) is stored in compression.json; format keys written here win over
    manifest keys of the same name. Tokenizer files are copied from `source_dir`, the original model folder.
    Example: `save_compressed(state, Path("out"), {"recipe": spec.model_dump()}, source_dir=Path("minilm"))`.
    """
    model = state.model
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"save_compressed needs a transformers PreTrainedModel, got {type(model).__name__}")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_configs(model, out_dir)
    tensors, aliases = packed_tensors(model.state_dict(), state.encodings)
    save_file(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
    records = {name: encoding_record(encoding) for name, encoding in state.encodings.items()}
    write_manifest(out_dir, manifest, records, aliases, state.rewrites)
    if source_dir is not None:
        copy_tokenizer_files(source_dir, out_dir)
    return out_dir


def write_manifest(out_dir: Path, manifest: Mapping[str, Any], encodings: Mapping[str, dict[str, Any]],
                   aliases: Mapping[str, str], rewrites: list[Rewrite]) -> None:
    """Write compression.json: `manifest` plus the format keys the loader reads (which win over manifest keys);
    `encodings` maps each encoded parameter to its `encoding_record`.

    Example: `write_manifest(out, {"job_id": "job-1"}, {"lm_head.weight": encoding_record(encoding)}, {}, [])`.
    """
    record = {
        **manifest,
        "format_version": FORMAT_VERSION,
        "encodings": dict(encodings),
        "aliases": dict(aliases),
        "rewrites": [dataclasses.asdict(rewrite) for rewrite in rewrites],
        "library_versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "safetensors": safetensors.__version__,
        },
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(record, indent=2, sort_keys=True), encoding="utf-8")


def load_compressed(path: Path | str, limits: ExtractionLimits = ARTIFACT_LIMITS,
                    dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Rebuild the model saved by `save_compressed`, in eval mode, from its folder or a .zip of that folder (a zip
    is extracted under `limits`), its float weights in `dtype`.

    Each weight is decoded and cast one at a time into the model's own memory, so a big artifact needs its packed
    files plus the model in `dtype`, never a second float32 copy: a 7B artifact loads in bfloat16 in ~14 GB.
    Example: `model = load_compressed("job-42.zip")`, or `load_compressed("llama-7b-int4.zip", dtype=torch.bfloat16)`.
    """
    path = Path(path)
    if path.is_dir():
        return _load_folder(path, dtype)
    if not zipfile.is_zipfile(path):
        raise UnsupportedModel(f"{path.name}: expected a compressed model folder or a .zip of one")
    with tempfile.TemporaryDirectory(prefix="mcs-artifact-") as tmp:
        return _load_folder(extract_archive(path, Path(tmp) / "artifact", limits), dtype)


def save_configs(model: PreTrainedModel, out_dir: Path) -> None:
    """Write config.json (naming the model's class) and generation_config.json; `model` may be on the meta device."""
    config = copy.deepcopy(model.config)
    # Configs built in code carry no architectures; without it the loader would rebuild the base model class.
    config.architectures = [type(model).__name__]
    config.save_pretrained(out_dir)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)


def packed_tensors(
    state_dict: dict[str, torch.Tensor], encodings: Mapping[str, Encoding]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to write (packed where encoded) and the aliases {name: stored name} of shared tensors."""
    unknown = sorted(set(encodings) - set(state_dict))
    if unknown:
        raise ValueError(f"encodings for names that are not in the model's state_dict: {unknown}")
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for group in _shared_groups(state_dict):
        stored = next((name for name in group if name in encodings), group[0])
        aliases.update({name: stored for name in group if name != stored})
        if stored in encodings:
            tensors.update(_checked_encoded_tensors(stored, encodings[stored], state_dict[stored]))
        else:
            tensors[stored] = state_dict[stored].contiguous()
    return tensors, aliases


def _shared_groups(state_dict: dict[str, torch.Tensor]) -> list[list[str]]:
    """state_dict names grouped by the memory they view: tied weights appear under several names."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in state_dict.items():
        memory = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        groups.setdefault((*memory, tensor.shape, tensor.stride(), tensor.dtype), []).append(name)
    return list(groups.values())


def _checked_encoded_tensors(name: str, encoding: Encoding, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    # A step that changed the weight after it was encoded would make the artifact compute something else.
    if not torch.equal(decode(encoding).to(weight.device, weight.dtype), weight):
        raise ValueError(f"{name} was modified after it was encoded; the encoding is stale")
    return encoded_tensors(name, encoding)


def encoded_tensors(name: str, encoding: Encoding) -> dict[str, torch.Tensor]:
    """The tensors an artifact stores for parameter `name`: `<name>.qweight`, `<name>.scale`, ..."""
    return {f"{name}.{key}": tensor.contiguous().cpu() for key, tensor in encoding.tensors.items()}


def encoding_record(encoding: Encoding) -> dict[str, Any]:
    """What compression.json records of an encoding: its format, meta and the names of its tensors."""
    return {"format": encoding.format, "meta": encoding.meta, "tensors": sorted(encoding.tensors)}


def copy_tokenizer_files(source_dir: Path, out_dir: Path) -> None:
    """Copy the tokenizer files of `source_dir` (regular files only, never pickles or code) into `out_dir`."""
    for pattern in TOKENIZER_PATTERNS:
        for path in source_dir.glob(pattern):
            # A symlink could point anywhere on the host, so only regular files are copied.
            if path.is_file() and not path.is_symlink() and path.suffix not in UNSAFE_SUFFIXES:
                shutil.copyfile(path, out_dir / path.name)


def _load_folder(folder: Path, dtype: torch.dtype) -> PreTrainedModel:
    manifest = read_manifest(folder)
    config = read_config(folder)
    state_dict = _read_state_dict(_artifact_weights(folder), manifest, dtype)
    cls = model_class_for(config)
    if manifest.rewrites:  # replaced modules (int8 kernels, factored layers) load through their own hooks
        model = _load_rebuilt(cls, config, manifest, state_dict)
        if dtype != torch.float32:
            model.to(dtype)  # type: ignore[arg-type]  # (transformers' wrapper of .to types its first argument)
        return model
    # Parameters on the meta device take the decoded tensors themselves (assign): no second copy of the weights.
    with parameters_on_meta():
        model = cls(config)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as exc:
        raise UnsupportedModel(f"{WEIGHTS_FILE} does not match {cls.__name__}: {exc}") from exc
    model.tie_weights()  # assign gave tied names separate Parameters over one memory: make them one again
    model.config.dtype = dtype
    return model.eval()


def _load_rebuilt(cls: type[PreTrainedModel], config: Any, manifest: "_Manifest",
                  state_dict: dict[str, torch.Tensor]) -> PreTrainedModel:
    # Every parameter is overwritten from the file, so random initialisation would only cost time.
    with no_init_weights():
        model = cls(config)
    for record in manifest.rewrites:  # structural changes first, so the saved weights fit the modules
        replay(model, Rewrite(record.kind, record.module, record.meta))
    model.tie_weights()  # what the constructor does unless weight init is skipped
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        raise UnsupportedModel(f"{WEIGHTS_FILE} does not match {cls.__name__}: {exc}") from exc
    return model.eval()


def read_manifest(folder: Path) -> _Manifest:
    """The validated compression.json of an artifact folder; UnsupportedModel if it is missing or invalid."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise UnsupportedModel(f"{MANIFEST_FILE} is missing: this is not a compressed model folder")
    try:
        return _Manifest.model_validate_json(model_file(folder, MANIFEST_FILE, ARTIFACT).read_bytes())
    except ValidationError as exc:
        raise UnsupportedModel(f"{MANIFEST_FILE} is invalid: {exc}") from exc


def stored_encodings(folder: Path) -> dict[str, Encoding]:
    """The encodings of an artifact folder as saved (packed tensors, not decoded), keyed by parameter name."""
    manifest = read_manifest(folder)
    try:
        stored = _load_stored(_artifact_weights(folder))
        return {
            name: Encoding(record.format, {key: stored[f"{name}.{key}"] for key in record.tensors}, record.meta)
            for name, record in manifest.encodings.items()
        }
    except (OSError, KeyError, safetensors.SafetensorError) as exc:
        raise UnsupportedModel(f"{WEIGHTS_FILE} does not match {MANIFEST_FILE}: {exc!r}") from exc


def _artifact_weights(folder: Path) -> list[Path]:
    """model.safetensors, or the shards its index names: plain `*.safetensors` names of regular files in `folder`."""
    if (folder / WEIGHTS_FILE).exists() or (folder / WEIGHTS_FILE).is_symlink():
        return [model_file(folder, WEIGHTS_FILE, ARTIFACT)]
    return weight_files(folder)


def _load_stored(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of `files`; a name stored in two shards is refused rather than one copy silently winning."""
    stored: dict[str, torch.Tensor] = {}
    for file in files:
        tensors = load_file(file)
        twice = sorted(stored.keys() & tensors.keys())
        if twice:
            raise UnsupportedModel(f"{file.name} stores {twice[0]!r}, which another shard stores too")
        stored.update(tensors)
    return stored


def _read_state_dict(files: list[Path], manifest: _Manifest, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Decode the packed tensors back into a plain state_dict, float tensors in `dtype`, shared tensors under each
    of their names."""
    try:
        stored = _load_stored(files)
        state_dict = {name: _decode_record(name, record, stored).to(dtype)
                      for name, record in manifest.encodings.items()}
        state_dict.update({name: tensor.to(dtype) if tensor.is_floating_point() else tensor
                           for name, tensor in stored.items()})
        state_dict.update({alias: state_dict[target] for alias, target in manifest.aliases.items()})
    except (OSError, KeyError, RuntimeError, safetensors.SafetensorError) as exc:
        raise UnsupportedModel(f"{WEIGHTS_FILE} does not match {MANIFEST_FILE}: {exc!r}") from exc
    return state_dict


def _decode_record(name: str, record: _EncodingRecord, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """Decode one parameter, removing its packed tensors from `stored` so only plain tensors remain there."""
    tensors = {key: stored.pop(f"{name}.{key}") for key in record.tensors}
    return decode(Encoding(format=record.format, tensors=tensors, meta=record.meta))

"""The compressed artifact: save/load round trips, packed int8 storage, tied weights, safe loading."""

import json
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import PreTrainedModel

import core
from core.compression.artifact import load_compressed, save_compressed
from core.compression.metrics import model_outputs, probe_inputs, weights_size_bytes
from core.compression.state import ModelState
from core.errors import UnsafeInput, UnsupportedModel
from tests.core.helpers import quantize
from tests.models import save_model_folder, tiny_bert, tiny_llama

MANIFEST = {"job_id": "job-1", "recipe": {"steps": [{"type": "quantize"}]}}


def saved_artifact(build: Callable[[], PreTrainedModel], directory: Path, **fields: object) -> tuple[nn.Module, Path]:
    """Quantize a fresh tiny model, save it, and return the in-memory quantized model with the folder."""
    state, _ = quantize(build(), **fields)
    return state.model, save_compressed(state, directory / "artifact", MANIFEST)


def assert_same_outputs(expected: nn.Module, loaded: nn.Module) -> None:
    inputs = probe_inputs(expected)
    assert torch.equal(model_outputs(expected, inputs), model_outputs(loaded, inputs))


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in folder.iterdir():
            zf.write(path, prefix + path.name)
    return archive


ROUND_TRIP_RECIPES = [
    {},
    {"granularity": "per_tensor", "symmetric": False, "exclude": ["*.dense"]},
    {"include_embeddings": False},  # Llama: the tied weight is then encoded under lm_head, its only selected user
]


@pytest.mark.parametrize("fields", ROUND_TRIP_RECIPES)
@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_folder_round_trip_is_bit_identical(tmp_path: Path, build: Callable[[], PreTrainedModel], fields: dict) -> None:
    quantized, folder = saved_artifact(build, tmp_path, **fields)
    loaded = core.load_compressed(folder)
    assert type(loaded) is type(quantized) and not loaded.training
    assert_same_outputs(quantized, loaded)


@pytest.mark.parametrize("prefix", ["", "job-1/"])
def test_zip_round_trip_is_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    quantized, folder = saved_artifact(tiny_llama, tmp_path)
    archive = zip_folder(folder, tmp_path / "artifact.zip", prefix)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    loaded = load_compressed(archive)
    assert_same_outputs(quantized, loaded)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not any((tmp_path / "tmp").iterdir()), "the extracted archive is removed after loading"


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_int8_codes_are_stored_so_the_file_shrinks(tmp_path: Path, build: Callable[[], PreTrainedModel]) -> None:
    fp32_size = weights_size_bytes(save_model_folder(build(), tmp_path / "fp32"))
    _, folder = saved_artifact(build, tmp_path, include_embeddings=True)  # the (tied) embedding too
    assert weights_size_bytes(folder) < 0.3 * fp32_size
    qweights = [tensor for key, tensor in stored_tensors(folder).items() if key.endswith(".qweight")]
    assert qweights and all(q.dtype == torch.int8 for q in qweights)


def test_tied_weights_are_stored_once(tmp_path: Path) -> None:
    _, folder = saved_artifact(tiny_llama, tmp_path, include_embeddings=True)
    keys = set(stored_tensors(folder))
    assert {"model.embed_tokens.weight.qweight", "model.embed_tokens.weight.scale"} <= keys
    assert not any(key.startswith("lm_head") for key in keys)
    manifest = json.loads((folder / "compression.json").read_text())
    assert manifest["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}


def test_unquantized_shared_weights_are_also_stored_once(tmp_path: Path) -> None:
    model = tiny_llama()
    folder = save_compressed(ModelState(model=model), tmp_path / "artifact", {})
    assert "lm_head.weight" not in stored_tensors(folder)
    assert_same_outputs(model, load_compressed(folder))


def test_manifest_records_format_encodings_and_versions(tmp_path: Path) -> None:
    _, folder = saved_artifact(tiny_bert, tmp_path, symmetric=False)
    manifest = json.loads((folder / "compression.json").read_text())
    assert manifest["job_id"] == "job-1" and manifest["recipe"] == MANIFEST["recipe"]
    assert manifest["format_version"] == 1
    assert set(manifest["library_versions"]) == {"torch", "transformers", "safetensors"}
    record = manifest["encodings"]["encoder.layer.0.attention.self.query.weight"]
    assert record["format"] == "int8_rtn"
    assert record["meta"] == {"bits": 8, "granularity": "per_channel", "symmetric": False}
    assert record["tensors"] == ["qweight", "scale", "zero_point"]
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["BertModel"]


def test_only_safe_tokenizer_files_are_copied(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "vocab.bin", "tokenizer.py"]:
        (source / name).write_text("x")
    (source / "vocab.json").symlink_to(tmp_path / "outside.json")
    (tmp_path / "outside.json").write_text("{}")
    state, _ = quantize(tiny_bert())
    folder = save_compressed(state, tmp_path / "artifact", {}, source_dir=source)
    copied = {path.name for path in folder.iterdir()} - {"config.json", "model.safetensors", "compression.json"}
    assert copied == {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model"}


def test_weight_changed_after_encoding_is_refused(tmp_path: Path) -> None:
    state, _ = quantize(tiny_bert())
    with torch.no_grad():
        state.model.pooler.dense.weight.mul_(0.5)
    with pytest.raises(ValueError, match="pooler.dense.weight was modified"):
        save_compressed(state, tmp_path / "artifact", {})


def test_archive_escaping_its_folder_is_refused(tmp_path: Path) -> None:
    _, folder = saved_artifact(tiny_bert, tmp_path)
    archive = zip_folder(folder, tmp_path / "evil.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr("../escaped.txt", "x")
    with pytest.raises(UnsafeInput, match="escaped.txt"):
        load_compressed(archive)
    assert not (tmp_path / "escaped.txt").exists()


def test_archive_with_symlink_is_refused(tmp_path: Path) -> None:
    _, folder = saved_artifact(tiny_bert, tmp_path)
    archive = zip_folder(folder, tmp_path / "link.zip")
    link = zipfile.ZipInfo("vocab.txt")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(link, "/etc/passwd")
    with pytest.raises(UnsafeInput, match="vocab.txt"):
        load_compressed(archive)


def test_plain_model_folder_or_other_file_is_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModel, match="compression.json"):
        load_compressed(save_model_folder(tiny_bert(), tmp_path / "fp32"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedModel, match="notes.txt"):
        load_compressed(tmp_path / "notes.txt")


def test_packed_tensors_missing_from_the_file_are_reported(tmp_path: Path) -> None:
    _, folder = saved_artifact(tiny_bert, tmp_path)
    manifest = json.loads((folder / "compression.json").read_text())
    manifest["encodings"]["pooler.dense.weight"]["tensors"].append("zero_point")
    (folder / "compression.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedModel, match="pooler.dense.weight.zero_point"):
        load_compressed(folder)


def test_import_core_does_not_import_torch() -> None:
    code = "import sys, core; assert callable(core.load_compressed); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


@pytest.mark.parametrize("build", [tiny_bert, tiny_llama])
def test_an_artifact_loads_in_bfloat16_from_its_decoded_weights(tmp_path: Path,
                                                                  build: Callable[[], PreTrainedModel]) -> None:
    """A big artifact loads in half precision without a float32 copy: each weight is decoded, cast and handed to
    the model as its own memory (the loaded float32 model's weights, cast, bit for bit)."""
    quantized, folder = saved_artifact(build, tmp_path)
    full, half = core.load_compressed(folder), core.load_compressed(folder, dtype=torch.bfloat16)
    for (name, expected), (_, actual) in zip(full.state_dict().items(), half.state_dict().items(), strict=True):
        assert actual.dtype == (torch.bfloat16 if expected.is_floating_point() else expected.dtype), name
        assert torch.equal(actual, expected.to(actual.dtype)), name
    assert half.config.dtype == torch.bfloat16 and not half.training
    if build is tiny_llama:
        assert half.lm_head.weight is half.model.embed_tokens.weight  # still tied
    inputs = probe_inputs(quantized)
    cosine = torch.nn.functional.cosine_similarity(model_outputs(full, inputs).flatten().float(),
                                                   model_outputs(half, inputs).flatten().float(), dim=0)
    assert cosine > 0.999

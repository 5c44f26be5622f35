"""Files a model folder names (the shards of model.safetensors.index.json, tokenizer and weight files in its configs)
must be plain names of regular safetensors or tokenizer files inside the folder: at upload (a clear 4xx, nothing
stored) and again when a worker loads the folder (UnsafeInput, nothing read). Positive controls show that
transformers alone would follow such names to another model's weights or to `torch.load`."""

import io
import json
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from core.compression.artifact import load_compressed, save_compressed
from core.compression.modelio import WEIGHTS_INDEX, load_model
from core.compression.state import ModelState
from core.errors import UnsafeInput, UnsupportedModel
from tests.fixtures.api import leftovers, zip_folder
from tests.models import save_model_folder, save_sharded_folder, tiny_bert, tiny_llama, tiny_tokenizer

pytestmark = pytest.mark.safety
FIRST_SHARD = "model-00001-of-00005.safetensors"


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sharded_folder(tiny_llama(), tmp_path_factory.mktemp("llama-shards"))


@pytest.fixture(scope="module")
def victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another model's folder beside the attacker's: the same tensor names, other values."""
    return save_model_folder(tiny_llama(seed=1), tmp_path_factory.mktemp("models") / "victim")


def copy_of(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def set_entry(folder: Path, value: object, tensor: str | None = None) -> Path:
    """Point one weight_map entry (the first unless named) at `value`."""
    index = json.loads((folder / WEIGHTS_INDEX).read_text())
    index["weight_map"][tensor or next(iter(index["weight_map"]))] = value
    (folder / WEIGHTS_INDEX).write_text(json.dumps(index))
    return folder


def post(client, auth, archive: bytes, filename: str = "m.zip"):
    return client.post("/v1/models", files={"file": (filename, archive, "application/octet-stream")}, headers=auth)


def assert_refused(response, status: int, code: str, message: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and message in error["message"], error
    assert leftovers() == []


def test_a_sharded_model_is_accepted(client, auth, shards):
    response = post(client, auth, zip_folder(shards))
    assert response.status_code == 201, response.text
    assert response.json()["architecture"] == "LlamaForCausalLM"
    assert response.json()["size_bytes"] == sum(p.stat().st_size for p in shards.glob("*.safetensors"))


@pytest.mark.parametrize("entry", [
    "../victim/model.safetensors",
    "..\\victim\\model.safetensors",
    "/etc/passwd",
    "ABSOLUTE",
    "sub/" + FIRST_SHARD,
    "./" + FIRST_SHARD,
    "..",
    "C:model.safetensors",
    FIRST_SHARD + "\u0000",
    "\ud800.safetensors",
    "x" * 300 + ".safetensors",
])
def test_index_entries_that_leave_the_folder_are_refused(client, auth, shards, victim, tmp_path, entry):
    folder = copy_of(shards, tmp_path / "m")
    (folder / "sub").mkdir()
    shutil.copy(folder / FIRST_SHARD, folder / "sub" / FIRST_SHARD)  # through a folder, to a file that exists
    entry = str(victim / "model.safetensors") if entry == "ABSOLUTE" else entry
    response = post(client, auth, zip_folder(set_entry(folder, entry)))
    assert_refused(response, 400, "unsafe_input", "not a plain file name inside the model folder")


def test_another_tenants_model_is_never_read(client, auth, other_auth, bert_folder, shards, tmp_path):
    """The stored layout is models/<id>/: `../<id>/model.safetensors` would be another tenant's weights."""
    victim = post(client, other_auth, zip_folder(bert_folder)).json()["id"]
    stored = leftovers()
    folder = set_entry(copy_of(shards, tmp_path / "m"), f"../{victim}/model.safetensors")
    for archive in (zip_folder(folder), zip_folder(folder, prefix="")):
        response = post(client, auth, archive)
        assert response.status_code == 400 and victim in response.json()["error"]["message"], response.text
    assert leftovers() == stored and client.get("/v1/models", headers=auth).json()["total"] == 0


@pytest.mark.parametrize("entry", ["pytorch_model-00001-of-00002.bin", "model.pt", "shard.safetensors.bin",
                                   "model.ckpt", "model.gguf", "model.safetensors.index.json"])
def test_index_entries_in_other_formats_are_refused_unread(client, auth, shards, tmp_path, monkeypatch, entry):
    monkeypatch.setattr(torch, "load", _no_torch_load)
    folder = copy_of(shards, tmp_path / "m")
    if not (folder / entry).exists():
        torch.save({"model.embed_tokens.weight": torch.ones(2)}, folder / entry)
    response = post(client, auth, zip_folder(set_entry(folder, entry)))
    assert_refused(response, 400, "unsafe_input", "is not a *.safetensors file")


@pytest.mark.parametrize(("index", "status", "message"), [
    ('{"metadata": {}}', 422, "weight_map must map"),
    ('{"weight_map": {}}', 422, "weight_map must map"),
    ('{"weight_map": ["model-00001-of-00005.safetensors"]}', 422, "weight_map must map"),
    ('{"weight_map": {"a": 1}}', 422, "values must be shard file names"),
    ('{"weight_map": {"a": ["x.safetensors"]}}', 422, "values must be shard file names"),
    ('{"weight_map": {"a": "model-00009-of-00009.safetensors"}}', 422, "is missing from the model folder"),
    ("[]", 422, "must hold a JSON object"),
    ("{not json", 422, "not valid JSON"),
    ('{"metadata": {"total_size": NaN}, "weight_map": {}}', 422, "not valid JSON"),
    ('{"metadata": {"total_size": ' + "9" * 5000 + '}, "weight_map": {}}', 422, "not valid JSON"),
    ('{"weight_map": {"a": "x"}}' + " " * (16 * 1024**2), 400, "the limit is 16,777,216"),
])
def test_malformed_indexes_are_refused(client, auth, shards, tmp_path, index, status, message):
    folder = copy_of(shards, tmp_path / "m")
    (folder / WEIGHTS_INDEX).write_text(index)
    response = post(client, auth, zip_folder(folder))
    assert_refused(response, status, "unsafe_input" if status == 400 else "unsupported_model", message)


def test_a_shard_that_is_a_folder_is_refused(client, auth, shards, tmp_path):
    folder = copy_of(shards, tmp_path / "m")
    (folder / FIRST_SHARD).unlink()
    (folder / FIRST_SHARD).mkdir()
    (folder / FIRST_SHARD / "x").write_bytes(b"x")
    assert_refused(post(client, auth, zip_folder(folder)), 400, "unsafe_input", "not a regular file")


def _tar_with_link(folder: Path, name: str, target: str, kind: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for file in sorted(folder.iterdir()):
            if file.name != name:
                tf.add(file, arcname=file.name)
        link = tarfile.TarInfo(name)
        link.type, link.linkname = kind, target
        tf.addfile(link)
    return buffer.getvalue()


def _zip_with_symlink(folder: Path, name: str, target: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for file in sorted(folder.iterdir()):
            if file.name != name:
                zf.write(file, file.name)
        link = zipfile.ZipInfo(name)
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, target)
    return buffer.getvalue()


@pytest.mark.parametrize("target", ["../victim/model.safetensors", "/etc/passwd", "model-00002-of-00005.safetensors"])
@pytest.mark.parametrize("name", [FIRST_SHARD, WEIGHTS_INDEX, "config.json"])
def test_symlinks_inside_archives_are_refused(client, auth, shards, name, target):
    for archive, filename in [(_tar_with_link(shards, name, target, tarfile.SYMTYPE), "m.tar.gz"),
                              (_tar_with_link(shards, name, target, tarfile.LNKTYPE), "m.tar.gz"),
                              (_zip_with_symlink(shards, name, target), "m.zip")]:
        response = post(client, auth, archive, filename)
        assert response.status_code == 400 and response.json()["error"]["code"] == "unsafe_input", response.text
    assert leftovers() == []


@pytest.fixture()
def with_tokenizer(bert_folder: Path, tmp_path: Path) -> Path:
    folder = copy_of(bert_folder, tmp_path / "m")
    tiny_tokenizer().save_pretrained(folder)
    (folder / "vocab.txt").write_text("[PAD]\n")
    (folder / "adapter_model.bin").write_bytes(b"not weights")
    (folder / "model.gguf").write_bytes(b"GGUF")
    return folder


@pytest.mark.parametrize(("file", "field", "value"), [
    ("tokenizer_config.json", "vocab_file", "/etc/passwd"),
    ("tokenizer_config.json", "vocab_file", "../victim/vocab.txt"),
    ("tokenizer_config.json", "tokenizer_file", "sub/tokenizer.json"),
    ("tokenizer_config.json", "fast_tokenizer_files", ["tokenizer.json", "../../tokenizer.json"]),
    ("tokenizer_config.json", "merges_file", {"nested": "/etc/hosts"}),
    ("special_tokens_map.json", "sp_model_path", "/etc/passwd"),
    ("generation_config.json", "assistant_model_dir", ".."),
    ("config.json", "transformers_weights", "../victim/model.safetensors"),
    ("config.json", "transformers_weights", "adapter_model.bin"),
    ("config.json", "gguf_file", "model.gguf"),
    ("config.json", "text_config", {"vocab_file": "/etc/passwd"}),
])
def test_config_fields_naming_files_stay_inside_the_folder(client, auth, with_tokenizer, file, field, value):
    path = with_tokenizer / file
    raw = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**raw, field: value}))
    response = post(client, auth, zip_folder(with_tokenizer))
    assert_refused(response, 400, "unsafe_input", f"{file}: ")


@pytest.mark.parametrize(("field", "value"), [
    ("vocab_file", "vocab.txt"), ("tokenizer_file", "tokenizer.json"), ("vocab_file", None), ("x_path", 3),
    ("name_or_path", "sentence-transformers/all-MiniLM-L6-v2"),
    ("_model_name_or_path", "Smollm2 135M 8k Lc100K Mix1 Ep2"),  # a label models converted from GGUF carry
])
def test_config_fields_naming_files_of_the_folder_are_accepted(client, auth, with_tokenizer, field, value):
    path = with_tokenizer / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    response = post(client, auth, zip_folder(with_tokenizer))
    assert response.status_code == 201, response.text


def test_a_named_file_that_is_absent_is_422(client, auth, with_tokenizer):
    path = with_tokenizer / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "merges_file": "merges.txt"}))
    assert_refused(post(client, auth, zip_folder(with_tokenizer)), 422, "unsupported_model", "'merges.txt' is missing")


def _no_torch_load(*args, **kwargs):
    raise AssertionError("torch.load was called")


def test_loading_a_sharded_model_never_calls_torch_load(shards, tmp_path, monkeypatch):
    folder = copy_of(shards, tmp_path / "m")
    set_entry(folder, "evil.bin")
    torch.save({"model.embed_tokens.weight": torch.ones(2)}, folder / "evil.bin")
    monkeypatch.setattr(torch, "load", _no_torch_load)
    with pytest.raises(AssertionError, match="torch.load was called"):  # positive control: transformers reaches it
        LlamaForCausalLM.from_pretrained(folder)
    with pytest.raises(UnsafeInput, match="evil.bin"):
        load_model(folder)
    loaded = load_model(shards)
    expected = tiny_llama().state_dict()
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())


def _link(folder: Path, name: str, target: Path) -> None:
    (folder / name).unlink()
    (folder / name).symlink_to(target)


@pytest.mark.parametrize("tamper", ["relative", "absolute", "folder", "shard_link", "index_link", "config_link",
                                    "tokenizer_path"])
def test_the_loader_refuses_a_folder_changed_after_upload(shards, victim, tamper):
    """Defense in depth: the worker re-checks what upload checked, so a stored folder changed later is refused."""
    folder = copy_of(shards, victim.parent / f"attacker-{tamper}")
    changes = {
        "relative": lambda: set_entry(folder, "../victim/model.safetensors"),
        "absolute": lambda: set_entry(folder, str(victim / "model.safetensors")),
        "folder": lambda: set_entry(folder, "../victim"),
        "shard_link": lambda: _link(folder, FIRST_SHARD, victim / "model.safetensors"),
        "index_link": lambda: _link(folder, WEIGHTS_INDEX, shards / WEIGHTS_INDEX),
        "config_link": lambda: _link(folder, "config.json", victim / "config.json"),
        "tokenizer_path": lambda: (folder / "tokenizer_config.json").write_text('{"vocab_file": "/etc/passwd"}'),
    }
    changes[tamper]()
    with pytest.raises(UnsafeInput):
        load_model(folder)


def test_transformers_alone_would_read_the_other_model(shards, victim):
    """Positive control for the test above: transformers follows `../victim/...` and loads the victim's weights."""
    folder = set_entry(copy_of(shards, victim.parent / "attacker-control"), "../victim/model.safetensors")
    loaded = LlamaForCausalLM.from_pretrained(folder)
    assert torch.equal(loaded.model.norm.weight, load_file(victim / "model.safetensors")["model.norm.weight"])


def test_a_missing_shard_is_refused_by_the_loader(shards, tmp_path):
    folder = copy_of(shards, tmp_path / "m")
    (folder / FIRST_SHARD).unlink()
    with pytest.raises(UnsupportedModel, match=f"'{FIRST_SHARD}' is missing"):
        load_model(folder)


def test_load_compressed_refuses_links(tmp_path):
    artifact = save_compressed(ModelState(tiny_bert()), tmp_path / "artifact", {})
    for name in ("model.safetensors", "compression.json", "config.json"):
        moved = (artifact / name).rename(tmp_path / name)
        (artifact / name).symlink_to(moved)
        with pytest.raises(UnsafeInput, match="link"):
            load_compressed(artifact)
        (artifact / name).unlink()
        moved.rename(artifact / name)
    assert isinstance(load_compressed(artifact), type(tiny_bert()))

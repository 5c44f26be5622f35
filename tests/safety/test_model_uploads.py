"""Model folders built to run code, allocate without bound, or escape: each upload is a clear 4xx, stores nothing
and runs nothing. Pickle payloads are checked to be live (they do run when unpickled) so the tests can fail."""

import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.api.conftest import zip_folder
from tests.safety.conftest import leftovers

pytestmark = pytest.mark.safety
ROOT = Path(__file__).resolve().parents[2]
SERVICE_PACKAGES = ("core", "api", "worker", "cli", "bench", "migrations")


def system_pickle(marker: Path) -> bytes:
    """`__reduce__` -> os.system, as the pickle opcodes a malicious checkpoint carries."""
    return b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."


def evasive_pickle(marker: Path) -> bytes:
    """No `os`/`subprocess` global for a scanner to see: pydoc.locate finds os.system at load time and
    operator.methodcaller calls it."""
    return (b"coperator\nmethodcaller\n(S'__call__'\nS'touch " + str(marker).encode() + b"'\ntR"
            b"(cpydoc\nlocate\n(S'os.system'\ntRtR.")


class _Reduce:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def torch_zip_pickle(marker: Path, path: Path) -> bytes:
    torch.save({"weight": _Reduce(marker)}, path)
    return path.read_bytes()


def assert_payload_is_live(payload: bytes, marker: Path) -> None:
    """Positive control in a separate process: the payload really runs its command when unpickled."""
    code = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"
    subprocess.run([sys.executable, "-c", code], input=payload, check=True)
    assert marker.exists()
    marker.unlink()


def model_folder(tmp_path: Path, bert_folder: Path, files: dict[str, bytes], config: dict | None = None) -> Path:
    folder = tmp_path / "upload"
    folder.mkdir()
    raw = config if config is not None else json.loads((bert_folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw))
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def post(client, auth, folder: Path):
    return client.post("/v1/models", files={"file": ("m.zip", zip_folder(folder), "application/zip")}, headers=auth)


@pytest.mark.parametrize("weights_name", ["pytorch_model.bin", "model.pt", "model.safetensors"])
@pytest.mark.parametrize("form", ["raw", "evasive", "torch_zip"])
def test_pickle_checkpoints_never_run(client, auth, bert_folder, tmp_path, monkeypatch, weights_name, form):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    payload = {"raw": lambda: system_pickle(marker), "evasive": lambda: evasive_pickle(marker),
               "torch_zip": lambda: torch_zip_pickle(marker, tmp_path / "ckpt.pt")}[form]()
    if form != "torch_zip":
        assert_payload_is_live(payload, marker)
    response = post(client, auth, model_folder(tmp_path, bert_folder, {weights_name: payload}))
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert weights_name in message and response.json()["error"]["code"] == "unsafe_input"
    assert not marker.exists() and leftovers() == []


def test_the_code_base_never_unpickles():
    """Only `torch.load(..., weights_only=True)` may appear in service code; no pickle/dill/joblib loading."""
    forbidden = re.compile(r"\b(pickle|cPickle|dill|joblib|cloudpickle)\.loads?\(|allow_pickle\s*=\s*True")
    offenders = []
    for package in SERVICE_PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            for match in re.finditer(r"torch\.load\(", text):
                call = text[match.start():text.find(")", match.start()) + 1]
                if "weights_only=True" not in call:
                    offenders.append(f"{path.relative_to(ROOT)}: {call}")
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in forbidden.finditer(text)]
    assert offenders == []


def test_remote_code_and_attention_overrides_are_ignored(client, auth, bert_folder, tmp_path):
    marker = tmp_path / "imported"
    config = json.loads((bert_folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel", "AutoConfig": "modeling_evil.EvilConfig"}
    config["_attn_implementation"] = "evil"
    config["_attn_implementation_internal"] = "evil"
    evil = f"open({str(marker)!r}, 'w').write('ran')\n".encode()
    folder = model_folder(tmp_path, bert_folder, {"model.safetensors": (bert_folder / "model.safetensors").read_bytes(),
                                                  "modeling_evil.py": evil}, config)
    response = post(client, auth, folder)
    assert response.status_code == 201, response.text
    assert response.json()["architecture"] == "BertModel"
    assert not marker.exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "../../etc/passwd"}, "model_type '../../etc/passwd'"),
    ({"vocab_size": 1e9}, "vocab_size must be an integer"),
    ({"vocab_size": 10**9}, "vocab_size = 1000000000 is outside"),
    ({"vocab_size": 4_000_000, "hidden_size": 1024, "num_attention_heads": 16}, "parameters; the limit is"),
    ({"num_hidden_layers": -2}, "num_hidden_layers = -2 is outside"),
    ({"num_hidden_layers": 100_000}, "num_hidden_layers = 100000 is outside"),
    ({"hidden_size": "64"}, "hidden_size must be an integer"),
    ({"hidden_size": 65, "num_attention_heads": 4}, "invalid bert config|cannot build"),
])
def test_hostile_configs_are_422_before_anything_is_allocated(client, auth, bert_folder, tmp_path, change, message):
    config = {**json.loads((bert_folder / "config.json").read_text()), **change}
    weights = {"model.safetensors": (bert_folder / "model.safetensors").read_bytes()}
    folder = model_folder(tmp_path, bert_folder, weights, config)
    started = time.monotonic()
    response = post(client, auth, folder)
    assert response.status_code == 422, response.text
    assert re.search(message, response.json()["error"]["message"])
    assert time.monotonic() - started < 10 and leftovers() == []


@pytest.mark.parametrize(("text", "status", "message"), [
    ('{"model_type": "bert", "pad": "' + "x" * 50 * 1024**2 + '"}', 400, "limit is 1,048,576"),
    ("[" * 100_000 + "]" * 100_000, 422, "not valid JSON"),
    ('{"a":' * 200_000 + "1" + "}" * 200_000, 400, "limit is"),
    ('{"a":' * 50_000 + "1" + "}" * 50_000, 422, "not valid JSON"),
])
def test_huge_or_deeply_nested_config_json(client, auth, bert_folder, tmp_path, text, status, message):
    weights = {"model.safetensors": (bert_folder / "model.safetensors").read_bytes()}
    folder = model_folder(tmp_path, bert_folder, weights)
    (folder / "config.json").write_text(text)
    response = post(client, auth, folder)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"] and leftovers() == []


def test_a_folder_with_only_pytorch_model_bin_is_refused_with_the_fix(client, auth, bert_folder, tmp_path):
    folder = model_folder(tmp_path, bert_folder, {"pytorch_model.bin": pickle.dumps({"w": [1.0]})})
    response = post(client, auth, folder)
    assert response.status_code == 400
    assert "save_pretrained(dir, safe_serialization=True)" in response.json()["error"]["message"]
    assert leftovers() == []

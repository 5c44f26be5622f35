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

from core.compression.modelio import load_model
from tests.fixtures.api import leftovers, zip_folder
from tests.models import save_model_folder, tiny_bert, tiny_llama, tiny_tokenizer

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
    """No `torch.load` at all (not even weights_only=True) and no pickle/dill/joblib loading in service code;
    transformers is never given a weights file to resolve (see test_shard_index.py)."""
    forbidden = re.compile(r"\btorch\.load\(|\b(pickle|cPickle|dill|joblib|cloudpickle)\.loads?\(|"
                           r"allow_pickle\s*=\s*True")
    offenders = [f"{path.relative_to(ROOT)}: {match.group(0)}"
                 for package in SERVICE_PACKAGES for path in (ROOT / package).rglob("*.py")
                 for match in forbidden.finditer(path.read_text())]
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
    ({"vocab_size": 16_000_000, "hidden_size": 8192, "num_attention_heads": 64}, "parameters; the limit is"),
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
    ('{"model_type": "bert", "vocab_size": ' + "9" * 5000 + "}", 422, "not valid JSON"),
    ('{"model_type": "bert", "pad_token_id": -' + "1" * 4301 + "}", 422, "not valid JSON"),
    ('{"model_type": "bert", "notes": [[' + "7" * 10_000 + "]]}", 422, "not valid JSON"),
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


def with_config(folder: Path, **changes: object) -> Path:
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, **changes}))
    return folder


def bert_copy(bert_folder: Path, tmp_path: Path, tokenizer: bool = False) -> Path:
    folder = tmp_path / "upload"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((bert_folder / name).read_bytes())
    if tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def assert_422(response, message: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_model" and message in error["message"], error
    assert leftovers() == []


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999", "[1.0, NaN]", '{"eps": -1e400}'])
@pytest.mark.parametrize("field", ["layer_norm_eps", "hidden_dropout_prob", "notes"])
def test_non_finite_numbers_in_config_json_are_422(client, auth, bert_folder, tmp_path, field, value):
    folder = bert_copy(bert_folder, tmp_path)
    text = (folder / "config.json").read_text().rstrip().removesuffix("}")
    (folder / "config.json").write_text(f'{text}, "{field}": {value}}}')
    assert_422(post(client, auth, folder), "config.json is not valid JSON")


@pytest.mark.parametrize("quantization", [
    {"quant_method": "bitsandbytes", "load_in_8bit": True}, {"quant_method": "gptq", "bits": 4},
    {"quant_method": "compressed-tensors", "format": "pack-quantized"}, {"quant_method": "no-such-quantizer"}, {},
    "fp8", False,
])
def test_any_quantization_config_is_refused(client, auth, bert_folder, tmp_path, quantization):
    assert_422(post(client, auth, with_config(bert_copy(bert_folder, tmp_path), quantization_config=quantization)),
               "quantization_config")


def test_a_nested_quantization_config_is_refused_and_null_is_none(client, auth, bert_folder, tmp_path):
    nested = with_config(bert_copy(bert_folder, tmp_path), text_config={"quantization_config": {"bits": 4}})
    assert_422(post(client, auth, nested), "quantization_config")
    (nested / "config.json").write_text((bert_folder / "config.json").read_text())
    assert post(client, auth, with_config(nested, quantization_config=None)).status_code == 201


@pytest.mark.parametrize(("file", "content", "message"), [
    ("tokenizer.json", "not json", "do not make a tokenizer"),
    ("tokenizer.json", "{}", "do not make a tokenizer"),
    ("tokenizer.json", "[]", "do not make a tokenizer"),
    ("tokenizer.json", '{"version": "1.0", "model": {"type": "NoSuchModel"}, "added_tokens": []}',
     "do not make a tokenizer"),
    ("tokenizer_config.json", '{"model_max_length": NaN}', "tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", '{"model_max_length": ' + "9" * 5000 + "}", "tokenizer_config.json is not valid JSON"),
    ("tokenizer_config.json", "[1]", "tokenizer_config.json must hold a JSON object"),
    ("vocab.txt", "\udcff\udcfe", "do not make a tokenizer"),
])
def test_tokenizer_files_that_do_not_build_are_422(client, auth, bert_folder, tmp_path, file, content, message):
    folder = bert_copy(bert_folder, tmp_path, tokenizer=file != "vocab.txt")
    (folder / file).write_bytes(content.encode("utf-8", "surrogateescape"))  # vocab.txt: bytes that are not UTF-8
    assert_422(post(client, auth, folder), message)


@pytest.mark.parametrize("tokenizer_class", ["EvilTokenizer", "NoSuchTokenizer"])
def test_a_tokenizer_class_transformers_lacks_is_never_imported(client, auth, bert_folder, tmp_path, tokenizer_class):
    """Without remote code, transformers builds the tokenizer from tokenizer.json, as the job will."""
    marker = tmp_path / "ran"
    folder = bert_copy(bert_folder, tmp_path, tokenizer=True)
    (folder / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": tokenizer_class, "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}))
    assert post(client, auth, folder).status_code == 201
    assert not marker.exists()


@pytest.mark.parametrize(("vocab_size", "added", "status"), [(100, 0, 422), (136, 0, 422), (137, 0, 201),
                                                              (137, 1, 422), (138, 1, 201)])
def test_the_tokenizer_must_fit_the_input_embeddings(client, auth, tmp_path, vocab_size, added, status):
    folder = save_model_folder(tiny_bert(vocab_size=vocab_size), tmp_path / "m")
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(added)])
    tokenizer.save_pretrained(folder)
    assert len(tokenizer) == 137 + added
    response = post(client, auth, folder)
    assert response.status_code == status, response.text
    if status == 422:
        assert_422(response, f"the tokenizer has {137 + added} tokens but the input embeddings have only {vocab_size}")


@pytest.mark.parametrize(("content", "message"), [
    ("not json", "generation_config.json is not valid JSON"),
    ("[]", "generation_config.json must hold a JSON object"),
    ('{"temperature": NaN}', "generation_config.json is not valid JSON"),
    ('{"max_length": 1' + "0" * 5000 + "}", "generation_config.json is not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "generation_config.json is not valid JSON"),
    ('{"max_new_tokens": "ten"}', "generation_config.json is invalid"),
    ('{"max_new_tokens": -1}', "generation_config.json is invalid"),
    ('{"early_stopping": "sometimes", "num_beams": 2}', "generation_config.json is invalid"),
    ('{"cache_implementation": "nope"}', "generation_config.json is invalid"),
    ('{"watermarking_config": 5}', "generation_config.json is invalid"),
])
def test_a_malformed_generation_config_is_422(client, auth, bert_folder, tmp_path, content, message):
    folder = bert_copy(bert_folder, tmp_path)
    (folder / "generation_config.json").write_text(content)
    assert_422(post(client, auth, folder), message)


def test_the_generation_config_is_loaded_with_the_model(client, auth, tmp_path):
    folder = save_model_folder(tiny_llama(), tmp_path / "m")
    (folder / "generation_config.json").write_text('{"max_new_tokens": 7, "eos_token_id": 2}')
    assert post(client, auth, folder).status_code == 201
    assert load_model(folder).generation_config.max_new_tokens == 7


def test_model_classes_that_load_files_of_their_own_are_refused(client, auth, bert_folder, tmp_path):
    """Qwen2.5-Omni's from_pretrained torch.loads spk_dict.pt from the folder, outside transformers' loader."""
    config = {"model_type": "qwen2_5_omni", "architectures": ["Qwen2_5OmniForConditionalGeneration"]}
    folder = model_folder(tmp_path, bert_folder, {"model.safetensors": (bert_folder / "model.safetensors").read_bytes(),
                                                  "spk_dict.pt": b"pickle"}, config)
    assert_422(post(client, auth, folder), "loads extra files of its own")

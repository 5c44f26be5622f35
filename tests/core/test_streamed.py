"""A model folder or an artifact run forward with one block in memory at a time computes what the loaded model
computes, bit for bit."""

from pathlib import Path
from typing import Any

import pytest
import torch

from core.compression import metrics
from core.compression.artifact import load_compressed
from core.compression.modelio import load_model
from core.compression.streamed import streamed_model
from core.errors import UnsupportedModel
from tests.core.test_execute_streaming import run_job
from tests.core.test_sequential import untied_bf16_llama
from tests.models import save_sharded_folder, tiny_bert, tiny_llama

CALIBRATION = {"num_samples": 4, "seq_len": 32}
RECIPES: dict[str, list[dict[str, Any]]] = {
    "rtn int4 g32 (layer by layer)": [
        {"type": "quantize", "method": "rtn", "bits": 4, "granularity": "per_group", "group_size": 32}],
    "svd_llm (offloaded, factored layers)": [
        {"type": "decompose", "method": "svd_llm", "params_kept": 0.8, "calibration": CALIBRATION}],
}


@pytest.fixture(scope="module", params=["tied fp32", "untied bf16"])
def llama(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tiny_llama() if request.param == "tied fp32" else untied_bf16_llama()
    return save_sharded_folder(model, tmp_path_factory.mktemp("llama") / "model", max_shard_size="60KB")


def test_the_original_streamed_computes_the_loaded_models_logits(llama: Path) -> None:
    model = load_model(llama, "cpu")
    inputs = metrics.probe_inputs(model, None)
    with streamed_model(llama) as streamed:
        assert torch.equal(metrics.model_outputs(streamed, inputs), metrics.model_outputs(model, inputs))


@pytest.mark.parametrize("recipe", RECIPES, ids=list(RECIPES))
def test_an_artifact_streamed_computes_what_load_compressed_computes(llama: Path, tmp_path: Path,
                                                                      recipe: str) -> None:
    run_job(llama, tmp_path, RECIPES[recipe], stream_above_bytes=0)
    loaded = load_compressed(tmp_path / "model")
    inputs = metrics.probe_inputs(loaded, None)
    with streamed_model(tmp_path / "model") as streamed:
        assert torch.equal(metrics.model_outputs(streamed, inputs), metrics.model_outputs(loaded, inputs))


def test_one_layer_holds_weights_at_a_time_and_none_after(llama: Path) -> None:
    with streamed_model(llama) as streamed:
        layers = [module for module in streamed.modules() if list(module.parameters(recurse=False))]
        only_its_own: list[bool] = []

        def check_loaded(layer: torch.nn.Module, args: object) -> None:  # by identity: tied embeddings and head
            loaded = {id(p) for module in layers for p in module.parameters(recurse=False) if not p.is_meta}
            only_its_own.append(loaded == {id(p) for p in layer.parameters(recurse=False)})

        hooks = [layer.register_forward_pre_hook(check_loaded) for layer in layers]
        with torch.no_grad():  # as every measurement runs: autograd would keep the layer's weights referenced
            streamed(**metrics.probe_inputs(streamed, None))
        for hook in hooks:
            hook.remove()
        assert only_its_own == [True] * len(layers)  # each layer's own loader ran first, no other layer's weights
        assert all(parameter.is_meta for parameter in streamed.parameters())  # the embeddings and head too


def test_a_model_without_repeated_blocks_is_refused(tmp_path: Path) -> None:
    config = tiny_bert().config
    config.num_hidden_layers = 1
    folder = save_sharded_folder(type(tiny_bert())(config), tmp_path / "bert")
    with pytest.raises(UnsupportedModel, match="repeated blocks"), streamed_model(folder):
        pass

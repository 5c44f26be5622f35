import pytest
import torch
from torch import nn

from core.compression.artifact import load_compressed, save_compressed
from core.compression.rewrites import apply_rewrite, register_rewrite, set_submodule
from core.compression.state import ModelState, Rewrite
from core.errors import UnsupportedModel
from tests.models import tiny_bert


@register_rewrite("test_bottleneck")
def _bottleneck(model: nn.Module, name: str, meta: dict) -> None:
    linear = model.get_submodule(name)
    rank = meta["rank"]
    set_submodule(model, name, nn.Sequential(nn.Linear(linear.in_features, rank, bias=False),
                                             nn.Linear(rank, linear.out_features)))


def test_rewrites_are_replayed_on_load(tmp_path):
    model = tiny_bert()
    state = ModelState(model)
    apply_rewrite(state, Rewrite("test_bottleneck", "pooler.dense", {"rank": 8}))
    assert isinstance(model.pooler.dense, nn.Sequential)
    with torch.no_grad():
        model.pooler.dense[0].weight.normal_()
    save_compressed(state, tmp_path / "out", {})
    loaded = load_compressed(tmp_path / "out")
    assert loaded.pooler.dense[0].weight.shape == (8, 64)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(model(ids).pooler_output, loaded(ids).pooler_output)


def test_unknown_rewrite_is_refused():
    with pytest.raises(UnsupportedModel, match="unknown structural rewrite"):
        apply_rewrite(ModelState(tiny_bert()), Rewrite("no_such_rewrite", "pooler.dense"))

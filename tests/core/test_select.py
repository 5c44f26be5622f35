"""The one targets/exclude resolver: patterns on module names, tied weights shared or skipped, nothing selected is
the user's error."""

from collections.abc import Callable

import pytest
from torch import nn

from core.compression.configs.prune import PruneMagnitude
from core.compression.configs.quantize import QuantizeRTN
from core.compression.select import Tied, held_back, held_back_note, is_selected, select_modules
from core.errors import InvalidSpec
from tests.models import tiny_bert, tiny_llama

TIED = ["model.embed_tokens", "lm_head"]
NAMING_THE_HEAD = QuantizeRTN(targets=["*", "lm_head"])  # else a generative model's head is held back


def test_a_shared_tied_weight_is_selected_once_with_every_module_using_it() -> None:
    model = tiny_llama()
    selection = select_modules(model, NAMING_THE_HEAD, (nn.Linear, nn.Embedding), tied="shared")
    assert set(TIED) <= set(selection.modules) and selection.skipped == []
    shared = {weight.name: weight for weight in selection.shared_weights()}
    assert shared["model.embed_tokens.weight"].modules == TIED
    assert "lm_head.weight" not in shared
    assert len(shared) == len(selection.modules) - 1


def test_a_skipped_tied_weight_is_left_out_and_named() -> None:
    selection = select_modules(tiny_llama(), NAMING_THE_HEAD, (nn.Linear,), tied="skipped")
    assert selection.skipped == ["lm_head"]
    assert "lm_head" not in selection.modules and selection.modules


def test_exclude_wins_over_targets() -> None:
    config = QuantizeRTN(targets=["model.layers.0.*"], exclude=["*.mlp.*"])
    names = select_modules(tiny_llama(), config, (nn.Linear,), tied="shared").modules
    assert names and all(name.startswith("model.layers.0.self_attn.") for name in names)
    assert is_selected("model.layers.0.self_attn.q_proj", config)
    assert not is_selected("model.layers.0.mlp.up_proj", config)


@pytest.mark.parametrize(("tied", "named"), [("shared", "select no nn.Linear or nn.Conv2d module"),
                                             ("skipped", "select no untied nn.Linear or nn.Conv2d module")])
def test_patterns_that_select_nothing_are_an_invalid_spec(tied: Tied, named: str) -> None:
    config = PruneMagnitude(targets=["decoder.*"])
    with pytest.raises(InvalidSpec, match=named) as raised:
        select_modules(tiny_llama(), config, (nn.Linear, nn.Conv2d), tied=tied)
    assert raised.value.message.startswith("prune: targets ['decoder.*'] minus exclude []")
    assert raised.value.details == {"targets": ["decoder.*"], "exclude": []}


def _untied_llama() -> nn.Module:
    config = tiny_llama().config
    config.tie_word_embeddings = False
    return type(tiny_llama())(config)


@pytest.mark.parametrize("model", [tiny_llama, _untied_llama], ids=["tied", "untied"])
def test_a_generative_models_head_is_left_alone_unless_named(model: Callable[[], nn.Module]) -> None:
    llama = model()
    default = select_modules(llama, QuantizeRTN(), (nn.Linear,), tied="shared")
    named = select_modules(llama, QuantizeRTN(targets=["*", "lm_head"]), (nn.Linear,), tied="shared")
    assert "lm_head" not in default.modules and "lm_head" in named.modules
    assert "lm_head" in (held_back_note(llama, QuantizeRTN()) or "")
    assert held_back_note(llama, QuantizeRTN(targets=["*", "lm_head"])) is None
    # include_embeddings names the embedding: a tied head then changes with it, an untied one stays out
    tied = llama.config.tie_word_embeddings
    assert held_back(llama, QuantizeRTN(include_embeddings=True)) == ([] if tied else ["lm_head"])
    assert held_back(llama, QuantizeRTN()) == (["model.embed_tokens", "lm_head"] if tied else ["lm_head"])


def test_an_encoder_without_a_head_keeps_every_default() -> None:
    bert = tiny_bert()
    assert held_back(bert, QuantizeRTN()) == [] and held_back_note(bert, QuantizeRTN()) is None

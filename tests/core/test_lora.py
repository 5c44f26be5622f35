"""LoRA recovery on tiny seeded models: only adapters train, a merge keeps pruning masks bit-exact and quantized
weights on their encodings, unmerged adapters survive the artifact round trip."""

import pytest
import torch

from core.compression.artifact import load_compressed, save_compressed
from core.compression.encoding import decode
from tests.core.training_helpers import FAST, run
from tests.models import tiny_llama

PRUNE = {"type": "prune", "method": "magnitude", "sparsity": 0.5}


def _lora(**fields: object) -> dict:
    return {"type": "lora", "max_steps": 12, "lr": 3e-3, "rank": 4, **FAST, **fields}


def _zeros(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p == 0 for name, p in model.named_parameters() if p.ndim == 2 and "embed" not in name}


def test_merge_keeps_sparsity_bit_exact_and_encodings_fresh() -> None:
    pruned, _ = run(tiny_llama(), [PRUNE])
    zeros_before = _zeros(pruned.model)
    state, [_, report] = run(tiny_llama(), [PRUNE, _lora(merge=True)])
    assert report.metrics["sparsity_before"] == report.metrics["sparsity_after"] == 0.5
    assert report.metrics["heldout_loss_after"] < report.metrics["heldout_loss_before"]
    assert "heldout_loss_merged" in report.metrics
    for name, zeros in _zeros(state.model).items():
        assert torch.equal(zeros, zeros_before[name]), name
    for name, encoding in state.encodings.items():
        assert torch.equal(decode(encoding), state.model.get_parameter(name)), name
    assert not state.rewrites  # merged adapters leave plain Linear modules


def test_task_objective_in_bf16_lowers_heldout_perplexity() -> None:
    state, [_, report] = run(tiny_llama(), [PRUNE, _lora(objective="task", precision="bf16", merge=True)])
    m = report.metrics
    assert m["heldout_perplexity_after"] < m["heldout_perplexity_before"]
    assert m["sparsity_before"] == m["sparsity_after"] == 0.5
    assert {p.dtype for p in state.model.parameters()} == {torch.float32}


def test_merge_refits_kmeans_codebooks() -> None:
    state, _ = run(tiny_llama(), [{"type": "quantize", "method": "kmeans", "bits": 4}, _lora(merge=True)])
    weight = state.model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(decode(state.encodings["model.layers.0.self_attn.q_proj.weight"]), weight)
    assert max(len(row.unique()) for row in weight) <= 16


def test_merge_refits_per_column_codebooks() -> None:
    steps = [{"type": "quantize", "method": "kmeans", "bits": 3, "granularity": "per_column"}, _lora(merge=True)]
    state, _ = run(tiny_llama(), steps)
    weight = state.model.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(decode(state.encodings["model.layers.0.self_attn.q_proj.weight"]), weight)
    assert max(len(column.unique()) for column in weight.t()) <= 8


def test_only_adapters_train_and_unmerged_adapters_survive_the_artifact(tmp_path) -> None:
    original = tiny_llama()
    base = {name: p.detach().clone() for name, p in original.named_parameters()}
    state, [report] = run(original, [_lora(merge=False, objective="task")])
    trained = dict(state.model.named_parameters())
    for name, value in base.items():
        live = trained.get(name) if name in trained else trained[name.replace(".weight", ".base_layer.weight")]
        assert torch.equal(live, value), name  # frozen
    assert report.metrics["params_trained"] == sum(p.numel() for n, p in trained.items() if ".lora_" in n)
    folder = save_compressed(state, tmp_path / "artifact", {})
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(load_compressed(folder)(ids).logits, state.model(ids).logits)


def test_adapters_of_pruned_weights_train_masked_so_the_merge_loses_nothing() -> None:
    state, [_, report] = run(tiny_llama(), [PRUNE, _lora(merge=True)])
    m = report.metrics
    assert m["heldout_loss_after"] < 0.9 * m["heldout_loss_before"]
    # Training saw W + ΔW ⊙ mask, which is exactly what the merge stores.
    assert m["heldout_loss_merged"] == pytest.approx(m["heldout_loss_after"], rel=1e-4)
    assert m["heldout_perplexity_merged"] == pytest.approx(m["heldout_perplexity_after"], rel=1e-4)

"""Distillation on tiny seeded models: it recovers fidelity on held-out text, keeps masks and encodings exact,
resumes from checkpoints, and refuses what cannot work with clear errors."""

import pytest
import torch

from core.compression.encoding import decode
from core.compression.spec import JobSpec
from core.errors import InvalidSpec, JobCancelled
from tests.core.training_helpers import FAST, run, texts
from tests.models import tiny_bert, tiny_llama

PRUNE = {"type": "prune", "method": "magnitude", "sparsity": 0.5}


def _distill(**fields: object) -> dict:
    return {"type": "distill", "max_steps": 25, "lr": 3e-3, **FAST, **fields}


def test_distill_recovers_a_pruned_encoder_on_heldout_text() -> None:
    state, [_, report] = run(tiny_bert(), [PRUNE, _distill()])
    m = report.metrics
    assert m["heldout_loss_after"] < 0.5 * m["heldout_loss_before"]
    assert m["train_loss_last"] < m["train_loss_first"]
    assert 1 - m["heldout_cosine_after"] < 0.5 * (1 - m["heldout_cosine_before"])
    assert m["sparsity_before"] == m["sparsity_after"] == 0.5


@pytest.mark.parametrize("loss", [{"embedding": 1.0}, {"hidden_mse": 1.0, "hidden_layers": "last", "embedding": 1.0}])
def test_embedding_objective_raises_heldout_cosine_by_a_margin(loss: dict) -> None:
    # 80% pruning: the tiny encoder's sentence embeddings barely move at 50% (cosine 0.9998 before training).
    _, [_, report] = run(tiny_bert(), [{**PRUNE, "sparsity": 0.8}, _distill(loss=loss)])
    m = report.metrics
    assert 1 - m["heldout_cosine_after"] < 0.3 * (1 - m["heldout_cosine_before"])
    assert m["train_loss_last"] < 0.5 * m["train_loss_first"]
    assert m["sparsity_after"] == m["sparsity_before"] == pytest.approx(0.8, abs=1e-3)


def test_bf16_mixed_precision_recovers_and_keeps_fp32_weights_and_masks() -> None:
    state, [_, report] = run(tiny_bert(), [PRUNE, _distill(precision="bf16")])
    _, [_, fp32] = run(tiny_bert(), [PRUNE, _distill()])
    m = report.metrics
    assert m["heldout_loss_after"] < 0.5 * m["heldout_loss_before"]
    assert m["sparsity_before"] == m["sparsity_after"] == 0.5
    assert {p.dtype for p in state.model.parameters()} == {torch.float32}
    # The first loss is computed before any update: only bf16 matmuls can make it differ from fp32's.
    assert m["train_loss_first"] != pytest.approx(fp32.metrics["train_loss_first"], rel=1e-5)
    assert m["heldout_loss_before"] == fp32.metrics["heldout_loss_before"]  # evaluation stays fp32


def test_distill_keeps_pruned_weights_zero_and_encodings_fresh() -> None:
    state, _ = run(tiny_llama(), [PRUNE, _distill(max_steps=10)])
    assert state.encodings
    for name, encoding in state.encodings.items():
        weight = state.model.get_parameter(name)
        assert torch.equal(decode(encoding), weight), name
        assert (weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_rtn_quantized_weights_stay_on_their_grid() -> None:
    state, [_, report] = run(tiny_llama(), [{"type": "quantize", "method": "rtn", "include_embeddings": True},
                                          _distill(max_steps=10)])
    assert report.metrics["encodings_retrained"] == len(state.encodings) - 1  # the tied embedding does not train
    for name, encoding in state.encodings.items():
        assert torch.equal(decode(encoding), state.model.get_parameter(name)), name


@pytest.mark.parametrize("granularity", ["per_channel", "per_column"])
def test_pruned_kmeans_weights_train_their_centroids_only(granularity: str) -> None:
    kmeans = {"type": "quantize", "method": "kmeans", "bits": 3, "granularity": granularity}
    before, _ = run(tiny_bert(), [PRUNE, kmeans])
    state, [_, _, report] = run(tiny_bert(), [PRUNE, kmeans, _distill(max_steps=15)])
    assert report.metrics["heldout_loss_after"] < report.metrics["heldout_loss_before"]
    name = "encoder.layer.0.intermediate.dense.weight"
    weight, old = state.model.get_parameter(name), before.model.get_parameter(name)
    assert torch.equal(decode(state.encodings[name]), weight)
    assert torch.equal(weight == 0, old == 0)  # the mask, and each kept weight's centroid index, stay
    groups = weight if granularity == "per_channel" else weight.t()
    assert max(len(group[group != 0].unique()) for group in groups) <= 8
    assert not torch.equal(weight, old)  # the centroids moved


def test_shallow_student_keeps_evenly_spaced_layers() -> None:
    model = tiny_bert()
    model.encoder.layer.extend(tiny_bert(seed=1).encoder.layer)  # 4 layers
    model.config.num_hidden_layers = 4
    state, [report] = run(model, [_distill(student={"layers": 2}, max_steps=10)])
    assert len(state.model.encoder.layer) == 2
    assert state.model.config.num_hidden_layers == 2
    assert [(r.kind, r.meta["keep"]) for r in state.rewrites] == [("keep_layers", [1, 3])]
    assert report.metrics["heldout_loss_after"] < report.metrics["heldout_loss_before"]


def test_resume_continues_at_the_last_checkpoint(tmp_path) -> None:
    steps = [PRUNE, _distill(max_steps=10)]
    reference, [_, full] = run(tiny_bert(), steps)
    # The first attempt is stopped right after its checkpoint at step 5, as if the worker died there.
    checkpoint = tmp_path / "step-01" / "latest.json"
    with pytest.raises(JobCancelled, match="after step 5 of 10"):
        run(tiny_bert(), steps, work_dir=tmp_path, should_stop=checkpoint.exists)
    messages: list[str] = []
    resumed, [_, report] = run(tiny_bert(), steps, work_dir=tmp_path, report=lambda f, m: messages.append(m))
    assert "resumed from the checkpoint after step 5" in messages
    assert sum(m.startswith("step ") for m in messages) == 5  # steps 6 to 10 only
    assert report.metrics["train_steps"] == 10
    assert report.metrics["train_loss_first"] == full.metrics["train_loss_first"]
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_too_few_rows_for_the_requested_steps_is_a_clear_error() -> None:
    with pytest.raises(InvalidSpec, match="too small for 100000 steps"):
        run(tiny_bert(), [_distill(max_steps=100_000)], rows=texts(rows=10))
    with pytest.raises(InvalidSpec, match="at least 2 non-empty rows"):
        run(tiny_bert(), [_distill()], rows=["only one row"])


def test_logits_loss_on_an_encoder_is_refused() -> None:
    with pytest.raises(InvalidSpec, match="logits_kl needs a model with a language-model head"):
        run(tiny_bert(), [_distill(loss={"logits_kl": 1.0})])


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([{"type": "encode"}, {"type": "distill"}], r"\(encode\) must come after every step that changes weights"),
        ([{"type": "lora", "merge": False}, {"type": "distill"}], "put it last or use merge: true"),
        ([{"type": "quantize"}, {"type": "prune"}], "prune first, then quantize"),
        ([{"type": "distill", "max_steps": 5, "epochs": 1}], "either max_steps or epochs"),
        ([{"type": "distill", "loss": {}}], "at least one of logits_kl"),
    ],
)
def test_recipes_that_cannot_work_are_refused_at_submission(steps: list[dict], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JobSpec.model_validate({"steps": steps})


def test_deep_compression_order_is_accepted() -> None:
    steps = [PRUNE, {"type": "quantize", "method": "kmeans", "bits": 4}, {"type": "distill"}, {"type": "encode"}]
    assert [s.type for s in JobSpec.model_validate({"steps": steps}).steps] == ["prune", "quantize", "distill",
                                                                                 "encode"]

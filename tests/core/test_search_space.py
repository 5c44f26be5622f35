"""The pure part of a search (core.compression.search): the constraint check, the Pareto front, the weights kept at
higher precision from the sensitivity scan, the recipes trials run (checked by running them), and the sampler."""

from typing import Any

import pytest
from pydantic import ValidationError

from core.compression.pipeline import run_pipeline
from core.compression.search import (
    Constraint,
    PastTrial,
    SearchSpace,
    SearchSpec,
    WeightSensitivity,
    default_space,
    judge,
    pareto_front,
    plan_trial,
    predicted_to_fail,
    probe_recipe,
    protected_weights,
    sensitivity_from,
    suggest,
    trial_recipe,
)
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext
from tests.core.quant_helpers import quantize_with
from tests.models import tiny_llama

SPACE = SearchSpace(methods=["rtn"], bits=[2, 4, 8], group_sizes=[32],
                    scan_calibration={"num_samples": 2, "seq_len": 16})
GRID = {"family": "grid", "method": "rtn", "bits": 2, "group_size": 32, "symmetric": True, "sparsity": 0.0}


def evaluation(metric: str, **measured: Any) -> dict[str, Any]:
    return {"evaluation": {"metrics": {metric: measured}}}


def test_each_bound_is_judged_on_its_quantity() -> None:
    ppl = evaluation("perplexity", original=10.0, artifact=10.4, delta=0.4, ci95=[0.1, 0.9], ratio=1.04,
                     ratio_ci95=[1.01, 1.09])
    assert judge(Constraint(metric="perplexity", max_ratio=1.05), ppl).feasible
    by_ci = judge(Constraint(metric="perplexity", max_ratio=1.05, use_ci=True), ppl)
    assert not by_ci.feasible and by_ci.violation == pytest.approx(0.04)
    accuracy = evaluation("accuracy", original=0.8, artifact=0.785, delta=-0.015, ci95=[-0.03, 0.0])
    drop = judge(Constraint(metric="accuracy", max_drop=0.01), accuracy)
    assert (drop.value, drop.feasible) == (pytest.approx(0.015), False) and drop.ci95 == (0.0, 0.03)
    cosine = evaluation("embedding_cosine", original=1.0, artifact=0.995, delta=-0.005, ci95=[-0.008, -0.002])
    at_least = judge(Constraint(metric="cosine", min=0.99), cosine)
    assert at_least.feasible and at_least.loss == pytest.approx(-0.995)
    assert not judge(Constraint(metric="cosine", min=0.993, use_ci=True), cosine).feasible  # its CI reaches 0.992
    assert not judge(Constraint(metric="perplexity", max_ratio=2.0), {}).feasible  # not measured: not met


def test_requests_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValidationError, match="exactly one of"):
        Constraint(metric="perplexity", max_ratio=1.1, max_drop=0.1)
    evaluate = {"dataset_id": "dst_1", "metrics": ["perplexity"]}
    with pytest.raises(ValidationError, match="must be one of evaluate.metrics"):
        SearchSpec(constraint={"metric": "accuracy", "max_drop": 0.01}, evaluate=evaluate)
    with pytest.raises(ValidationError, match="held-out"):
        SearchSpec(constraint={"metric": "perplexity", "max_ratio": 1.1}, evaluate=evaluate,
                   space={"calibration": {"dataset_id": "dst_1"}})
    with pytest.raises(ValidationError, match="unknown preset"):
        SearchSpace(presets=["w3a3-magic"])


def test_the_pareto_front_keeps_points_no_other_beats_on_both() -> None:
    assert pareto_front([(1, 3), (2, 1), (2, 2), (3, 0.5)]) == [0, 1, 3]
    assert pareto_front([(1, 1), (1, 1)]) == [0, 1]  # equal points do not beat each other


def test_the_most_sensitive_weights_per_parameter_are_protected_within_the_share() -> None:
    scan = {"big": WeightSensitivity(100, ("big",), {2: 0.5, 8: 0.0}),
            "small": WeightSensitivity(10, ("small",), {2: 0.2, 8: 0.0}),
            "calm": WeightSensitivity(10, ("calm",), {2: 0.001, 8: 0.0})}
    assert protected_weights(scan, 2, 8, share=0.1) == ["small"]  # 0.02 per parameter beats big's 0.005
    assert protected_weights(scan, 2, 8, share=0.95) == ["small", "big"]
    assert protected_weights(scan, 2, 8, share=0.0, forced=["calm"]) == ["calm"]
    assert protected_weights(scan, 8, 8, share=0.5) == []  # nothing is narrower than the protected width


def test_a_failed_trial_sets_the_damage_budget_of_later_ones() -> None:
    scan = {"a": WeightSensitivity(10, ("a",), {2: 0.3, 8: 0.0}), "b": WeightSensitivity(10, ("b",), {2: 0.05, 8: 0})}
    free = plan_trial({**GRID, "protect": 0.0}, SPACE, scan, failed_damage=[])
    assert free.protected == [] and free.damage == pytest.approx(0.35)
    budgeted = plan_trial({**GRID, "protect": 0.0}, SPACE, scan, failed_damage=[0.3])
    assert budgeted.protected == ["a"] and budgeted.damage == pytest.approx(0.05)  # a alone breaks the budget
    failed = [({**GRID, "protect": 0.0}, 0.35)]
    assert predicted_to_fail({**GRID, "protect": 0.0}, free, failed)
    assert not predicted_to_fail({**GRID, "protect": 0.0}, budgeted, failed)
    assert not predicted_to_fail({**GRID, "group_size": 64, "protect": 0.0}, free, failed)  # another grid
    assert not predicted_to_fail({**GRID, "bits": 4, "protect": 0.0}, free, failed)


def test_a_trial_protects_what_trial_0_found_sensitive_and_its_recipe_runs() -> None:
    """The probe's scan of a tied Llama, a trial planned from it, and that trial's recipe on the model: the
    protected weights (the tied embedding and head among them) come out at 8 bits, the rest at 2."""
    [probe] = probe_recipe(SPACE)
    _, report = quantize_with(tiny_llama(), **{k: v for k, v in probe.items() if k != "type"})
    scan = sensitivity_from(report.metrics)
    embedding = scan["model.embed_tokens.weight"]
    assert embedding.modules == ("model.embed_tokens", "lm_head") and embedding.params == 512 * 64
    assert set(embedding.by_bits) == {2, 4, 8} and embedding.by_bits[2] >= embedding.by_bits[8]
    plan = plan_trial({**GRID, "protect": 0.0}, SPACE, scan, failed_damage=[embedding.by_bits[2]])
    assert "model.embed_tokens.weight" in plan.protected
    state = ModelState(model=tiny_llama())
    run_pipeline(state, JobSpec(steps=plan.steps).steps, StepContext())
    widths = {name: encoding.meta["bits"] for name, encoding in state.encodings.items()}
    assert set(widths) == set(scan)
    assert all(widths[name] == (8 if name in plan.protected else 2) for name in scan), widths


def test_a_trial_may_protect_more_modules_than_a_hand_written_list_would_hold() -> None:
    """A 7B Llama's 224 Linears, 30% of them protected, are listed by name in the trial's exclude and targets:
    the recipe is a valid job spec (a 64-entry cap on those lists once left such a trial pending forever)."""
    names = [f"model.layers.{i}.mlp.{kind}_proj" for i in range(32) for kind in ("gate", "up", "down")]
    sensitivity = {f"{name}.weight": WeightSensitivity(1, (name,), {4: 0.1, 8: 0.0}) for name in names}
    protected = list(sensitivity)[:70]
    steps = trial_recipe({**GRID, "bits": 4}, SPACE, protected, sensitivity)
    assert len(steps[0]["exclude"]) == 70 and len(steps[1]["targets"]) == 70
    JobSpec.model_validate({"steps": steps})
    with pytest.raises(ValidationError, match="at most 1024"):
        JobSpec.model_validate({"steps": [{**steps[0], "exclude": [f"m{i}" for i in range(1025)]}]})


def test_the_sampler_is_seeded_and_never_repeats_a_trial() -> None:
    past = [PastTrial({**GRID, "protect": 0.0}, running=False, objective=0.1, violation=0.5)]
    first = suggest(SPACE, past, with_probe=True)
    assert first == suggest(SPACE, past, with_probe=True)  # the same trials give the same suggestion
    seen = [past[0].params]
    for _ in range(6):
        params = suggest(SPACE, past, with_probe=True)
        assert params is not None and params not in seen
        seen.append(params)
        past.append(PastTrial(params, running=True, objective=None, violation=None))
    assert suggest(SPACE, past, with_probe=True, skip=lambda params: True) is None  # all predicted to fail


def test_each_architecture_gets_a_space() -> None:
    causal, encoder = default_space("LlamaForCausalLM"), default_space("BertModel")
    assert "gptq" in causal.methods and causal.include_head and "w8a16-rtn" in causal.presets
    assert encoder.methods == ["rtn"] and None in encoder.group_sizes and not encoder.include_head

"""Search to a quality budget: the pure part (no database, queue or web framework).

A search (`POST /v1/searches`) runs trials, each an ordinary compression job with `evaluate`, until its budget is
spent, and keeps the smallest (or fastest) recipe whose evaluation meets the constraint. This module holds what needs
no service: the request's types, the default space per architecture, the recipe a trial's parameters stand for, the
constraint check, the sampler glue and the Pareto front. `core.service.searches` stores trials and submits jobs.

Not a blind grid. Trial 0 is a mixed-precision job whose sensitivity scan measures, for every weight at every
width of the space, how far the model's outputs move with that weight alone quantized (`quantize_mixed`). Later
trials use it twice:
- a sampled share of the quantized parameters, the weights that lose the most per byte at the trial's width, is
  kept at `protect_bits` (the same greedy order mixed precision uses);
- once a trial has broken the constraint, its predicted damage (the sum of its weights' sensitivities) is a measured
  budget: every weight whose sensitivity alone reaches it is kept at `protect_bits` in later trials, and a candidate
  predicted to do at least as much damage as a failed trial of the same grid is not run (the sampler is told it
  failed).
The sampler is optuna's TPE (fixed seed), rebuilt from the stored trials each time one is asked for, so the search
keeps no state outside its row.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.compression.configs.calibration import CalibrationData
from core.compression.presets import PRESETS
from core.compression.spec import EvaluateSpec, EvaluationMetric, model_kind

Objective = Literal["min_size", "min_latency"]
ConstraintMetric = Literal[EvaluationMetric, "cosine", "output_cosine"]
BOUNDS = ("max_ratio", "max_drop", "max_increase", "min", "max")
SEED = 0  # the sampler's seed; each ask adds the number of trials so far
STARTUP_TRIALS = 3  # TPE samples at random until this many trials have finished
MAX_ASKS = 32  # asks per new trial before the space counts as exhausted (every answer was run or predicted to fail)
PROBE = "sensitivity-probe"


class Constraint(BaseModel):
    """A bound on one evaluation metric of the artifact, judged on the point estimate or, with `use_ci`, on the worse
    end of its 95% CI. Exactly one bound: `max_ratio` (artifact / original, e.g. perplexity), `max_drop` (original
    minus artifact, e.g. accuracy), `max_increase` (artifact minus original), `min` or `max` (the artifact's value).
    `cosine` means `embedding_cosine`; `output_cosine` is the probe every job measures without a dataset.

    Example: `{"metric": "perplexity", "max_ratio": 1.05}`, `{"metric": "accuracy", "max_drop": 0.01}`,
    `{"metric": "cosine", "min": 0.99}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: ConstraintMetric
    max_ratio: float | None = Field(None, gt=0)
    max_drop: float | None = Field(None, ge=0)
    max_increase: float | None = Field(None, ge=0)
    min: float | None = None
    max: float | None = None
    use_ci: bool = Field(False, description="judge the worse end of the 95% CI instead of the point estimate")

    @model_validator(mode="after")
    def _one_bound(self) -> Self:
        given = [name for name in BOUNDS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"a constraint takes exactly one of {', '.join(BOUNDS)} "
                             f"(got {', '.join(given) or 'none'})")
        if self.use_ci and self.metric == "output_cosine":
            raise ValueError("output_cosine has no CI: use_ci needs an evaluation metric")
        return self

    @property
    def evaluation_metric(self) -> str:
        return "embedding_cosine" if self.metric == "cosine" else self.metric

    @property
    def bound(self) -> tuple[str, float]:
        name = next(name for name in BOUNDS if getattr(self, name) is not None)
        return name, float(getattr(self, name))

    def describe(self) -> str:
        name, value = self.bound
        shown = {"max_ratio": f"artifact / original <= {value:g}", "max_drop": f"original - artifact <= {value:g}",
                 "max_increase": f"artifact - original <= {value:g}", "min": f">= {value:g}", "max": f"<= {value:g}"}
        return f"{self.metric} {shown[name]}" + (" (worse end of the 95% CI)" if self.use_ci else "")


class SearchSpace(BaseModel):
    """What trials may try. Each trial picks one preset or one weight-only grid (method, bits, group size, symmetry,
    optional magnitude sparsity first), with the most sensitive weights at `protect_bits` (see the module's doc).
    `group_sizes` holds `null` for one scale per output channel.

    Example: `{"methods": ["rtn", "gptq"], "bits": [4, 5, 6, 8], "group_sizes": [64, 128], "presets": ["w8a16-rtn"]}`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    presets: list[str] = Field(default_factory=list, max_length=len(PRESETS))
    methods: list[Literal["rtn", "gptq"]] = Field(default_factory=lambda: ["rtn"],  # type: ignore[arg-type]
                                                  min_length=1, max_length=2)
    bits: list[int] = Field(default_factory=lambda: [4, 8], min_length=1, max_length=7)
    group_sizes: list[int | None] = Field(default_factory=lambda: [128],  # type: ignore[arg-type]
                                          min_length=1, max_length=6)
    symmetric: list[bool] = Field(default_factory=lambda: [True], min_length=1, max_length=2)
    sparsity: list[float] = Field(default_factory=lambda: [0.0], min_length=1, max_length=6)
    protect_bits: int = Field(8, ge=3, le=8, description="width of the weights kept at higher precision")
    max_protect_share: float = Field(0.25, ge=0, le=0.9,
                                     description="at most this share of the quantized parameters is protected")
    include_head: bool = Field(True, description="quantize the output head and the embeddings too (a tied "
                                                 "embedding is most of a small LM's bytes)")
    sensitivity_scan: bool = Field(True, description="trial 0 measures per-weight sensitivity (mixed precision)")
    calibration: CalibrationData = Field(default_factory=lambda: CalibrationData(num_samples=32, seq_len=256),
                                         description="calibration of gptq trials")
    # The scan runs one forward per weight and width: mixed precision's own default is 8 x 128 tokens.
    scan_calibration: CalibrationData = Field(default_factory=lambda: CalibrationData(num_samples=8, seq_len=128),
                                              description="the tokens trial 0's sensitivity scan measures on")

    @model_validator(mode="after")
    def _valid_values(self) -> Self:
        if unknown := [name for name in self.presets if name not in PRESETS]:
            raise ValueError(f"unknown preset(s) {', '.join(unknown)}; GET /v1/presets lists them")
        if bad := [b for b in self.bits if not 2 <= b <= 8]:
            raise ValueError(f"bits must lie in 2..8, not {bad}")
        if bad_groups := [g for g in self.group_sizes if g is not None and not 8 <= g <= 8192]:
            raise ValueError(f"group_sizes must lie in 8..8192 (or null: per channel), not {bad_groups}")
        if bad_sparsity := [s for s in self.sparsity if not 0 <= s < 1]:
            raise ValueError(f"sparsity must lie in [0, 1), not {bad_sparsity}")
        for name in ("bits", "group_sizes", "symmetric", "sparsity", "methods"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a value twice: {values}")
        return self


class Budget(BaseModel):
    """When the search stops asking for trials: after `max_trials`, or `max_seconds` after it started (trials then
    in flight still finish)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_trials: int = Field(12, ge=1, le=200)
    max_seconds: int | None = Field(None, ge=10, le=7 * 24 * 3600)


class SearchSpec(BaseModel):
    """A search: objective, constraint, held-out evaluation, space (default: per architecture), budget and how many
    trials run at once. Example: `{"objective": "min_size", "constraint": {"metric": "perplexity", "max_ratio": 1.1},
    "evaluate": {"dataset_id": "dst_...", "metrics": ["perplexity"], "max_samples": 64},
    "budget": {"max_trials": 12}, "parallelism": 2}`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    objective: Objective = "min_size"
    constraint: Constraint
    evaluate: EvaluateSpec
    space: SearchSpace | None = Field(None, description="default: the space for the model's architecture")
    budget: Budget = Field(default_factory=Budget)
    parallelism: int = Field(1, ge=1, le=16, description="trials in flight at once")

    @model_validator(mode="after")
    def _constraint_is_measured(self) -> Self:
        metric = self.constraint.evaluation_metric
        if metric != "output_cosine" and metric not in self.evaluate.metrics:
            raise ValueError(f"the constraint's metric {metric} must be one of evaluate.metrics "
                             f"({', '.join(self.evaluate.metrics)})")
        space = self.space
        calibrated = {space.calibration.dataset_id, space.scan_calibration.dataset_id} if space else set()
        if self.evaluate.dataset_id in calibrated:
            raise ValueError("evaluate.dataset_id is the space's calibration dataset; evaluate on held-out data")
        return self


def default_space(architecture: str) -> SearchSpace:
    """The space a search gets when it names none: causal LMs try rtn and gptq at 3-8 bits in groups of 64 or 128
    (GPTQ's calibration kept small); encoders rtn at 4-8 bits per group or channel (DATA.md: int4 alone costs
    MiniLM 0.93-0.96 cosine, so protection matters)."""
    if model_kind(architecture) == "causal_lm":
        return SearchSpace(methods=["rtn", "gptq"], bits=[3, 4, 5, 6, 8], group_sizes=[64, 128],
                           symmetric=[True, False], presets=["w8a16-rtn"])
    return SearchSpace(methods=["rtn"], bits=[4, 5, 6, 8], group_sizes=[32, 64, None], symmetric=[True, False],
                       include_head=False)


# ---- sensitivity and recipes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightSensitivity:
    """One weight of the probe's scan: its parameter count, the modules that use it, 1 - output cosine per width."""

    params: int
    modules: tuple[str, ...]
    by_bits: dict[int, float]


Sensitivity = dict[str, WeightSensitivity]


def probe_recipe(space: SearchSpace) -> list[dict[str, Any]]:
    """Trial 0: mixed precision over the space's widths (and `protect_bits`) at the middle of their range, whose
    scan measures every weight at every width. A real candidate too: its artifact and evaluation count."""
    widths = sorted({*space.bits, space.protect_bits})
    group = next((g for g in space.group_sizes if g is not None), None)
    step: dict[str, Any] = {"type": "quantize", "method": "mixed", "bits": widths,
                            "budget": {"avg_bits": (widths[0] + widths[-1]) / 2},
                            "symmetric": space.symmetric[0],
                            "calibration": space.scan_calibration.model_dump(mode="json", exclude_none=True)}
    if len(widths) == 1:  # mixed needs two widths: the space has one, so the scan compares it with 8
        step["bits"] = sorted({widths[0], 8}) if widths[0] != 8 else [4, 8]
        step["budget"] = {"avg_bits": (step["bits"][0] + step["bits"][-1]) / 2}
    step.update({"granularity": "per_group", "group_size": group} if group else {"granularity": "per_channel"})
    return [{**step, **_head_fields(space)}]


def sensitivity_from(step_metrics: dict[str, Any]) -> Sensitivity:
    """The probe step's scan (`sensitivity/<weight>/int<b>`, `params/<weight>`, `modules/<weight>`)."""
    found: Sensitivity = {}
    names = {key.split("/", 1)[1].rsplit("/", 1)[0] for key in step_metrics if key.startswith("sensitivity/")}
    for name in sorted(names):
        by_bits = {int(key.rsplit("/int", 1)[1]): float(value) for key, value in step_metrics.items()
                   if key.startswith(f"sensitivity/{name}/int")}
        modules = str(step_metrics.get(f"modules/{name}") or name.removesuffix(".weight")).split(",")
        found[name] = WeightSensitivity(int(step_metrics.get(f"params/{name}", 1)), tuple(modules), by_bits)
    return found


def sensitivity_json(sensitivity: Sensitivity) -> dict[str, Any]:
    return {name: {"params": w.params, "modules": list(w.modules), "by_bits": {str(b): s for b, s in w.by_bits.items()}}
            for name, w in sensitivity.items()}


def sensitivity_of(stored: dict[str, Any] | None) -> Sensitivity:
    return {name: WeightSensitivity(int(w["params"]), tuple(w["modules"]), {int(b): float(s) for b, s in
                                                                            w["by_bits"].items()})
            for name, w in (stored or {}).items()}


def protected_weights(sensitivity: Sensitivity, bits: int, protect_bits: int, share: float,
                      forced: Sequence[str] = ()) -> list[str]:
    """The weights kept at `protect_bits` when the rest get `bits`: `forced` ones, then those that lose the most
    sensitivity per parameter by going to `bits` (mixed precision's greedy order) while their parameters stay
    within `share` of all. Example: with `{"a": 10 params, sensitivity 0.1 at 4 bits; "b": 10, 0.01}` and share 0.5,
    `a` is protected."""
    if bits >= protect_bits or not sensitivity:
        return []
    total = sum(w.params for w in sensitivity.values())
    chosen, spent = list(dict.fromkeys(name for name in forced if name in sensitivity)), 0
    spent = sum(sensitivity[name].params for name in chosen)
    ranked = sorted(sensitivity, key=lambda name: -_gain(sensitivity[name], bits, protect_bits))
    for name in ranked:
        if name in chosen or _gain(sensitivity[name], bits, protect_bits) <= 0:
            continue
        if spent + sensitivity[name].params <= share * total:
            chosen.append(name)
            spent += sensitivity[name].params
    return chosen


def _gain(weight: WeightSensitivity, bits: int, protect_bits: int) -> float:
    low, high = _at(weight, bits), _at(weight, protect_bits)
    return (low - high) / max(weight.params, 1)


def _at(weight: WeightSensitivity, bits: int) -> float:
    """The weight's sensitivity at `bits`; between scanned widths, the next narrower one (pessimistic)."""
    if bits in weight.by_bits:
        return weight.by_bits[bits]
    narrower = [b for b in weight.by_bits if b <= bits]
    return weight.by_bits[max(narrower)] if narrower else max(weight.by_bits.values(), default=0.0)


def predicted_damage(sensitivity: Sensitivity, bits: int, protect_bits: int, protected: Sequence[str]) -> float:
    """Sum of each weight's sensitivity at the width it gets: the scan's additive estimate of a recipe's damage."""
    kept = set(protected)
    return sum(_at(w, protect_bits if name in kept else bits) for name, w in sensitivity.items())


def breaking_weights(sensitivity: Sensitivity, bits: int, damage_budget: float | None) -> list[str]:
    """Weights whose sensitivity alone at `bits` reaches the damage of a trial that broke the constraint."""
    if damage_budget is None:
        return []
    return [name for name, w in sensitivity.items() if _at(w, bits) >= damage_budget]


def trial_recipe(params: dict[str, Any], space: SearchSpace, protected: Sequence[str],
                 sensitivity: Sensitivity) -> list[dict[str, Any]]:
    """The steps a trial's parameters stand for: a preset's, or (magnitude sparsity, then) the grid on every weight
    but the protected ones, which get round-to-nearest at `protect_bits` per channel."""
    if params["family"] != "grid":
        return [dict(step) for step in PRESETS[params["family"]].steps]
    steps: list[dict[str, Any]] = []
    if params.get("sparsity", 0.0) > 0:
        steps.append({"type": "prune", "method": "magnitude", "sparsity": params["sparsity"]})
    modules = sorted({module for name in protected for module in sensitivity[name].modules})
    quantize: dict[str, Any] = {"type": "quantize", "method": params["method"], "bits": params["bits"],
                                "symmetric": params["symmetric"], **_head_fields(space)}
    group = params["group_size"]
    quantize.update({"granularity": "per_group", "group_size": group} if group else {"granularity": "per_channel"})
    if params["method"] == "gptq":
        quantize["calibration"] = _calibration(space)
    if modules:
        quantize["exclude"] = modules
    steps.append(quantize)
    if modules:
        embeddings = any("embed" in module for module in modules)
        steps.append({"type": "quantize", "method": "rtn", "bits": space.protect_bits, "targets": modules,
                      "granularity": "per_channel", "include_embeddings": embeddings})
    return steps


def _head_fields(space: SearchSpace) -> dict[str, Any]:
    return {"targets": ["*", "lm_head"], "include_embeddings": True} if space.include_head else {}


def _calibration(space: SearchSpace) -> dict[str, Any]:
    return space.calibration.model_dump(mode="json", exclude_none=True)


# ---- the constraint and the front -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Judged:
    """A finished trial's measured quantity for the constraint (`value`, oriented so that lower is better as
    `loss`), its CI, and whether the constraint holds (`violation` <= 0)."""

    value: float | None
    ci95: tuple[float | None, float | None] | None
    loss: float
    violation: float

    @property
    def feasible(self) -> bool:
        return self.violation <= 0


def judge(constraint: Constraint, metrics: dict[str, Any]) -> Judged:
    """Check a trial job's metrics against the constraint. A metric the job did not measure breaks it."""
    name, limit = constraint.bound
    if constraint.metric == "output_cosine":
        value = (metrics.get("after") or {}).get("output_cosine")
        return _judged(name, limit, value, None, value)
    measured = ((metrics.get("evaluation") or {}).get("metrics") or {}).get(constraint.evaluation_metric) or {}
    value, interval = _quantity(name, measured)
    worse = _worse_end(name, interval) if constraint.use_ci else value
    return _judged(name, limit, value, interval, worse)


def _quantity(bound: str, measured: dict[str, Any]) -> tuple[float | None, tuple[float | None, float | None] | None]:
    """The number the bound limits and its CI: the ratio, the drop (original - artifact), the increase (artifact -
    original) or the artifact's own value."""
    if bound == "max_ratio":
        ratio, original, artifact = measured.get("ratio"), measured.get("original"), measured.get("artifact")
        if ratio is None and original and artifact is not None:
            ratio = artifact / original
        interval = measured.get("ratio_ci95")
        return ratio, (tuple(interval) if interval else None)
    delta, interval = measured.get("delta"), measured.get("ci95")
    if bound == "max_drop":
        flipped = (-interval[1] if interval[1] is not None else None, -interval[0] if interval[0] is not None
                   else None) if interval else None
        return (-delta if delta is not None else None), flipped
    if bound == "max_increase":
        return delta, (tuple(interval) if interval else None)
    artifact = measured.get("artifact", measured.get("value"))
    shift = (artifact - delta) if artifact is not None and delta is not None else None
    values = (None if shift is None or interval is None or interval[0] is None else interval[0] + shift,
              None if shift is None or interval is None or interval[1] is None else interval[1] + shift)
    return artifact, (values if values[0] is not None else None)


def _worse_end(bound: str, interval: tuple[float | None, float | None] | None) -> float | None:
    if interval is None:
        return None
    return interval[0] if bound == "min" else interval[1]


def _judged(bound: str, limit: float, value: float | None, interval: Any, checked: float | None) -> Judged:
    if checked is None or math.isnan(checked):
        return Judged(value, interval, math.inf, math.inf)
    if bound == "min":
        return Judged(value, interval, -checked, limit - checked)
    return Judged(value, interval, checked, checked - limit)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimised), by the first coordinate.
    Example: `pareto_front([(1, 3), (2, 1), (2, 2), (3, 0.5)])` is `[0, 1, 3]`."""
    front = [i for i, (x, y) in enumerate(points)
             if not any((ox <= x and oy <= y) and (ox < x or oy < y) for ox, oy in points)]
    return sorted(front, key=lambda i: points[i])


# ---- the sampler ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PastTrial:
    """A trial as the sampler sees it: its parameters (None for the probe), whether it is still running, its
    objective value and constraint violation once it finished, None for both when it failed."""

    params: dict[str, Any] | None
    running: bool
    objective: float | None
    violation: float | None
    damage: float | None = None


def _choices(space: SearchSpace, with_probe: bool) -> dict[str, list[Any]]:
    families = ["grid", *space.presets]
    return {"family": families, "method": list(space.methods), "bits": list(space.bits),
            "group_size": list(space.group_sizes), "symmetric": list(space.symmetric),
            "sparsity": list(space.sparsity),
            "protect": _protect_levels(space) if with_probe else [0.0]}


def _protect_levels(space: SearchSpace) -> list[float]:
    levels = [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9]
    return [level for level in levels if level <= space.max_protect_share] or [0.0]


def suggest(space: SearchSpace, past: Sequence[PastTrial], with_probe: bool,
            skip: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
    """The next trial's parameters from TPE on the past trials (each with its constraint violation, which
    optuna's TPE ranks infeasible trials by), never one already tried; `skip(params)` is True for a candidate
    predicted to fail (it is told to the sampler as such). None when `MAX_ASKS` asks found nothing new: the space
    is exhausted."""
    import optuna  # only the services that advance searches load it

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    choices = _choices(space, with_probe)
    distributions = {name: optuna.distributions.CategoricalDistribution(values) for name, values in choices.items()}
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(
        seed=SEED + len(past), n_startup_trials=STARTUP_TRIALS, constant_liar=True))
    tried = set()
    for trial in past:
        if trial.params is None or trial.params.get("family") is None:
            continue
        params = _in_space(trial.params, choices)
        tried.add(_key(trial.params))
        if params is not None:
            study.add_trial(_frozen(optuna, params, distributions, trial))
    for _ in range(MAX_ASKS):
        asked = study.ask()
        params = {"family": asked.suggest_categorical("family", choices["family"])}
        if params["family"] == "grid":
            params.update({name: asked.suggest_categorical(name, values) for name, values in choices.items()
                           if name != "family"})
            if params["bits"] >= space.protect_bits:  # nothing to protect: one trial stands for every share
                params["protect"] = 0.0
        if _key(params) in tried or (skip is not None and skip(params)):
            study.tell(asked, state=optuna.trial.TrialState.FAIL)
            tried.add(_key(params))
            continue
        return params
    return None


def _frozen(optuna: Any, params: dict[str, Any], distributions: dict[str, Any], trial: PastTrial) -> Any:
    used = {name: distributions[name] for name in params}
    if trial.running:
        return optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, params=params, distributions=used)
    if trial.objective is None or trial.violation is None:
        return optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params=params, distributions=used)
    violation = trial.violation if math.isfinite(trial.violation) else 1e9
    return optuna.trial.create_trial(value=trial.objective, params=params, distributions=used,
                                     constraints={"quality": violation})


def _in_space(params: dict[str, Any], choices: dict[str, list[Any]]) -> dict[str, Any] | None:
    """The parameters the sampler's distributions can hold (a trial from a preset or an older space may not)."""
    kept = {name: value for name, value in params.items() if name in choices}
    if any(value not in choices[name] for name, value in kept.items()):
        return None
    return kept


def _key(params: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((name, value) for name, value in params.items() if name != "probe"))


@dataclass(frozen=True)
class Plan:
    """What a trial runs: its steps, the weights kept at `protect_bits` and its predicted damage (None without a
    scan, or for a preset)."""

    steps: list[dict[str, Any]]
    protected: list[str]
    damage: float | None


def plan_trial(params: dict[str, Any], space: SearchSpace, sensitivity: Sensitivity,
               failed_damage: Sequence[float]) -> Plan:
    """The trial's recipe: the sampled share of the most sensitive weights protected, plus every weight that alone
    does as much damage as the least damaging trial that broke the constraint (`failed_damage`)."""
    if params["family"] != "grid":
        return Plan(trial_recipe(params, space, [], sensitivity), [], None)
    bits = params["bits"]
    forced = breaking_weights(sensitivity, bits, min(failed_damage) if failed_damage else None)
    protected = protected_weights(sensitivity, bits, space.protect_bits, params.get("protect", 0.0), forced)
    damage = predicted_damage(sensitivity, bits, space.protect_bits, protected) if sensitivity else None
    return Plan(trial_recipe(params, space, protected, sensitivity), protected, damage)


GRID_KEYS = ("method", "bits", "group_size", "symmetric", "sparsity")


def predicted_to_fail(params: dict[str, Any], plan: Plan, failed: Sequence[tuple[dict[str, Any], float]]) -> bool:
    """A grid candidate predicted to do at least the damage of a trial of the same grid (method, width, group size,
    symmetry, sparsity) that broke the constraint, i.e. one that protects less than it by the scan's ranking:
    running it would only confirm the failure."""
    if plan.damage is None:
        return False
    return any(all(params.get(key) == other.get(key) for key in GRID_KEYS) and plan.damage >= damage
               for other, damage in failed)

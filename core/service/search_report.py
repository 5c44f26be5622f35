"""A search's report (`GET /v1/searches/{id}/report`): one self-contained HTML page in the job report's style
(core/service/reports.py: its helpers, style and Content-Security-Policy).

Every trial on a size-quality plot, the Pareto front through them and the constraint as a line; the trials with the
constrained metric's 95% CI; the best recipe; the weights the sensitivity scan found most sensitive. Everything
comes from the search's row.
"""

import html
import json
from typing import Any

from sqlalchemy.orm import Session

from core.compression.search import SearchSpec, pareto_front, sensitivity_of
from core.service.db.models import Search
from core.service.db.repositories import Models, Searches
from core.service.reports import STYLE, _bars_png, _ci, _figure, _fmt, _img, _note, _png, _table

SENSITIVE_SHOWN = 20  # the chart of the most sensitive weights; the search's JSON has every one


def search_report(session: Session, tenant_id: str, search_id: str) -> str:
    """The HTML report of the tenant's search (another tenant's is a 404 like an unknown id); a running search shows
    the trials so far."""
    search: Search = Searches(session, tenant_id).get(search_id)
    models = Models(session, tenant_id)
    model_name = models.get(search.model_id).name if search.model_id and models.exists(search.model_id) \
        else "(deleted model)"
    spec = SearchSpec.model_validate(search.spec)
    sections = [_header(search, spec, model_name), _plot(search.trials, spec), _trials(search.trials, spec),
                _best(search.best), _sensitivity(search)]
    body = "\n".join(section for section in sections if section)
    title = html.escape(f"Report of search {search.id}")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>")


def _header(search: Search, spec: SearchSpec, model_name: str) -> str:
    ended = sum(1 for trial in search.trials if trial["status"] in ("succeeded", "failed", "cancelled"))
    rows = [("Search", search.id), ("Status", search.status), ("Model", f"{model_name} ({search.model_id})"),
            ("Objective", spec.objective), ("Constraint", spec.constraint.describe()),
            ("Evaluation", f"dataset {spec.evaluate.dataset_id}, {', '.join(spec.evaluate.metrics)}, first "
                           f"{spec.evaluate.max_samples} rows"),
            ("Budget", f"{spec.budget.max_trials} trials" + (f" or {spec.budget.max_seconds} s"
                                                              if spec.budget.max_seconds else "")),
            ("Trials", f"{len(search.trials)} started, {ended} ended, {spec.parallelism} at a time"),
            ("Created", search.created_at.isoformat()),
            ("Finished", search.finished_at.isoformat() if search.finished_at else "not yet")]
    note = _note(search.message)
    return f"<h1>{html.escape(f'Search report: {model_name}')}</h1>{_table(['', ''], rows, header=False)}{note}"


def _measured(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [t for t in trials if t.get("objective") is not None and t.get("value") is not None]


def _plot(trials: list[dict[str, Any]], spec: SearchSpec) -> str:
    measured = _measured(trials)
    if not measured:
        return "<h2>Size and quality of every trial</h2>" + _note("no trial has been measured yet")
    front = pareto_front([(t["objective"], t["loss"]) for t in measured if t.get("loss") is not None])
    chart = _img(_scatter_png(measured, front, spec), "every trial: size against quality, the Pareto front and the "
                 "constraint line")
    note = (f"x: the objective ({_objective_label(spec)}); y: {_quantity_label(spec)}. Filled: met the constraint; "
            "the line joins the Pareto front (no other trial is both smaller and better); the dashed line is the "
            "constraint. Error bars: the 95% paired-bootstrap CI."
            + (" The constraint judges the CI's worse end, and so does the front." if spec.constraint.use_ci else ""))
    return f"<h2>Size and quality of every trial</h2>{chart}{_note(note)}"


def _scatter_png(measured: list[dict[str, Any]], front: list[int], spec: SearchSpec) -> bytes:
    figure = _figure(8, 4.5)
    axes = figure.add_subplot()
    for trial in measured:
        low, high = (trial.get("ci95") or [None, None])[:2]
        error = [[trial["value"] - low], [high - trial["value"]]] if low is not None and high is not None else None
        color = "#54a24b" if trial.get("feasible") else "#e45756"
        axes.errorbar(trial["objective"], trial["value"], yerr=error, fmt="o", color=color, capsize=3,
                      markerfacecolor=color if trial.get("feasible") else "white")
        axes.annotate(str(trial["number"]), (trial["objective"], trial["value"]), textcoords="offset points",
                      xytext=(5, 4), fontsize=8)
    points = [measured[i] for i in front]
    axes.plot([t["objective"] for t in points], [t["value"] for t in points], color="#4c78a8", drawstyle="steps-post",
              label="Pareto front")
    limit = _limit_line(spec)
    axes.axhline(limit, color="#1f2328", linestyle="--", label=f"constraint: {spec.constraint.describe()}")
    low, high = axes.get_ylim()  # the line is drawn inside the plot, never on its frame
    margin = 0.05 * (max(high, limit) - min(low, limit) or 1.0)
    axes.set_ylim(min(low, limit - margin), max(high, limit + margin))
    axes.set_xlabel(_objective_label(spec))
    axes.set_ylabel(_quantity_label(spec))
    axes.set_title("Every trial: size against quality")
    axes.legend(loc="best", fontsize=8)
    return _png(figure)


def _limit_line(spec: SearchSpec) -> float:
    return spec.constraint.bound[1]


def _objective_label(spec: SearchSpec) -> str:
    return "weights as stored / original" if spec.objective == "min_size" else "latency / original (probe batch)"


def _quantity_label(spec: SearchSpec) -> str:
    bound, _ = spec.constraint.bound
    metric = spec.constraint.metric
    return {"max_ratio": f"{metric}: artifact / original", "max_drop": f"{metric}: original - artifact",
            "max_increase": f"{metric}: artifact - original"}.get(bound, f"{metric} of the artifact")


def _trials(trials: list[dict[str, Any]], spec: SearchSpec) -> str:
    if not trials:
        return ""
    rows = [(t["number"], t["status"], _recipe_label(t), _fmt(t.get("size_ratio")), _fmt(t.get("size_bytes")),
             _fmt(t.get("latency_ms")), _fmt(t.get("value")), _ci(t.get("ci95")),
             _met(t.get("feasible")), len(t.get("protected") or []),
             _fmt(t.get("damage")), t.get("job_id") or "—") for t in trials]
    headers = ["#", "status", "recipe", "size / original", "bytes", "latency (ms)", _quantity_label(spec),
               "95% CI", "met", "protected", "predicted damage", "job"]
    return f"<h2>Trials</h2>{_table(headers, rows)}" + _note(
        "protected: weights kept at the space's protect_bits because the sensitivity scan ranked them worst (or "
        "they alone reached the damage of a trial that broke the constraint); predicted damage: the sum of each "
        "weight's scanned sensitivity (1 - output cosine) at its width")


def _met(feasible: bool | None) -> str:
    return "—" if feasible is None else "yes" if feasible else "no"


def _recipe_label(trial: dict[str, Any]) -> str:
    params = trial.get("params") or {}
    family = params.get("family")
    if family != "grid":
        return str(family)
    group = params.get("group_size")
    text = f"{params['method']} int{params['bits']} " + (f"g{group}" if group else "per channel")
    text += " sym" if params.get("symmetric") else " asym"
    if params.get("sparsity"):
        text += f", {params['sparsity']:.0%} sparse"
    return text + (f", protect {params['protect']:.0%}" if params.get("protect") else "")


def _best(best: dict[str, Any] | None) -> str:
    if not best:
        return "<h2>Best recipe</h2>" + _note("no trial has met the constraint (yet)")
    rows = [("trial", best["number"]), ("job", best.get("job_id")), ("artifact", best.get("artifact_id") or "—"),
            ("size / original", _fmt(best.get("size_ratio"))), ("bytes", _fmt(best.get("size_bytes"))),
            ("metric", _fmt(best.get("value"))), ("95% CI", _ci(best.get("ci95")))]
    recipe = html.escape(json.dumps({"steps": best.get("steps")}, indent=2))
    return f"<h2>Best recipe</h2>{_table(['', ''], rows, header=False)}<pre>{recipe}</pre>"


def _sensitivity(search: Search) -> str:
    sensitivity = sensitivity_of(search.sensitivity)
    if not sensitivity:
        return ""
    widths = sorted({b for w in sensitivity.values() for b in w.by_bits})
    narrow = widths[0]
    worst = dict(sorted(((name, w.by_bits.get(narrow, 0.0)) for name, w in sensitivity.items()),
                        key=lambda item: -item[1])[:SENSITIVE_SHOWN])
    chart = _img(_bars_png(worst, "1 - output cosine", f"the {len(worst)} most sensitive weights at {narrow} bits"),
                 "per-weight sensitivity")
    return (f"<h2>Sensitivity (trial 0)</h2>{chart}"
            + _note(f"{len(sensitivity)} weights scanned at {', '.join(map(str, widths))} bits"))

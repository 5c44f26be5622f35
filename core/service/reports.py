"""A job's report (`GET /v1/jobs/{id}/report`): one self-contained HTML page a person can read and keep.

Everything comes from the job's row (its metrics and its steps' metrics, which the library measured): the before/
after table with the evaluation's CIs, the per-step waterfall, the per-layer error or sensitivity the job has, and
where the artifact's bytes went. Charts are PNGs drawn with matplotlib and embedded as data: URIs, so the page fetches
nothing (its Content-Security-Policy forbids it) and works offline. Every string from the user is escaped.
"""

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Session

from core.service.db.models import Job, JobStep
from core.service.db.repositories import Jobs, Models

# The page loads nothing: images are data: URIs and the style is inline.
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
MAX_LAYER_BARS = 40  # the per-layer chart shows the layers that moved most; the table lists every one
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; color: #1f2328; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.warning { background: #fff8c5; border: 1px solid #d4a72c; padding: .5rem 1rem; font-weight: 600; }
.note { color: #59636e; font-size: .85rem; } img { max-width: 100%; }
"""


def job_report(session: Session, tenant_id: str, job_id: str) -> str:
    """The HTML report of the tenant's job `job_id` (another tenant's is a 404 like an unknown id); a job that has
    not ended yet shows what it has so far."""
    job: Job = Jobs(session, tenant_id).get(job_id)
    models = Models(session, tenant_id)
    model_name = models.get(job.model_id).name if job.model_id and models.exists(job.model_id) else "(deleted model)"
    metrics = job.metrics or {}
    sections = [
        _header(job, model_name, metrics),
        _warnings(metrics),
        _before_after(metrics),
        _evaluation(metrics.get("evaluation")),
        _waterfall(job.steps),
        _layers(job.steps, metrics),
        _bytes(metrics.get("bytes")),
        _notes(job.steps),
    ]
    body = "\n".join(section for section in sections if section)
    title = html.escape(f"Report of job {job.id}")
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}\n</body></html>")


# ---- sections --------------------------------------------------------------------------------------------------


def _header(job: Job, model_name: str, metrics: dict[str, Any]) -> str:
    steps = ", ".join(_step_name(step) for step in job.steps) or "none (an evaluation)"
    rows = [("Job", job.id), ("Status", job.status), ("Model", f"{model_name} ({job.model_id})"),
            ("Steps", steps), ("Engine", metrics.get("engine", "")), ("Device", metrics.get("device", "")),
            ("Created", job.created_at.isoformat()),
            ("Finished", job.finished_at.isoformat() if job.finished_at else "not yet")]
    if job.error:
        rows.append(("Error", f"{job.error.get('code')}: {job.error.get('message')}"))
    return f"<h1>{html.escape(f'Compression report: {model_name}')}</h1>{_table(['', ''], rows, header=False)}"


def _warnings(metrics: dict[str, Any]) -> str:
    return "".join(f"<p class=\"warning\">{html.escape(str(w))}</p>" for w in metrics.get("warnings", []))


def _before_after(metrics: dict[str, Any]) -> str:
    before, after = metrics.get("before"), metrics.get("after")
    if not before or not after:
        return ""
    rows = [(label, _fmt(before.get(key)), _fmt(after.get(key)), _fmt(_ratio(before.get(key), after.get(key))))
            for key, label in (("size_bytes", "weights (bytes)"), ("parameters", "parameters"),
                               ("output_cosine", "output cosine vs original (probe)"),
                               ("latency_ms", "latency (ms, probe batch)"))]
    table = _table(["", "original", "artifact", "artifact / original"], rows)
    return f"<h2>Before and after</h2>{table}{_note(metrics.get('note'))}"


def _evaluation(evaluation: dict[str, Any] | None) -> str:
    if not evaluation:
        return ""
    found = evaluation.get("metrics", {})
    rows: list[tuple[Any, ...]]
    if all("value" in measured for measured in found.values()):  # a model alone: values, no deltas
        rows = [(name, _fmt(m.get("value")), _ci(m.get("ci95")), _fmt(m.get("n"))) for name, m in found.items()]
        table = _table(["metric", "value", "95% CI", "samples"], rows)
    else:
        rows = [(name, _fmt(m.get("original")), _fmt(m.get("artifact")), _fmt(m.get("delta")), _ci(m.get("ci95")),
                 _fmt(m.get("ratio")), _fmt(m.get("n"))) for name, m in found.items()]
        table = _table(["metric", "original", "artifact", "delta", "95% CI of delta", "ratio", "samples"], rows)
    boot = evaluation.get("bootstrap", {})
    note = (f"dataset {evaluation.get('dataset_id')}, {evaluation.get('samples')} rows; {boot.get('method', '')}, "
            f"{boot.get('resamples')} resamples, seed {boot.get('seed')}")
    notes = "".join(_note(f"{name}: {m.get('note')}") for name, m in found.items())
    return f"<h2>Evaluation on your data</h2>{table}{_note(note)}{notes}"


def _waterfall(steps: Sequence[JobStep]) -> str:
    records = [(_step_name(step), (step.metrics or {}).get("waterfall")) for step in steps]
    measured = [(name, record) for name, record in records if record and record.get("size_bytes") is not None]
    skipped = next((record["note"] for _, record in records if record and record.get("size_bytes") is None), None)
    if not measured:
        return f"<h2>What each step cost</h2>{_note(skipped or 'no step has finished yet')}" if steps else ""
    quality = _quality_metric(measured[0][1])
    labels = ["original", *(name for name, _ in measured)]
    sizes = [measured[0][1]["original_size_bytes"], *(record["size_bytes"] for _, record in measured)]
    values = [_quality_value(measured[0][1], quality, original=True),
              *(_quality_value(record, quality) for _, record in measured)]
    latencies = [measured[0][1].get("original_latency_ms"), *(record.get("latency_ms") for _, record in measured)]
    chart = _img(_waterfall_png(labels, sizes, values, quality), "per-step waterfall: size and quality after each step")
    rows = [(label, _fmt(size), _fmt(value), _fmt(latency))
            for label, size, value, latency in zip(labels, sizes, values, latencies, strict=True)]
    table = _table(["after", "weights (bytes)", quality, "latency (ms)"], rows)
    return f"<h2>What each step cost</h2>{chart}{table}{_note(measured[0][1].get('note'))}"


def _layers(steps: Sequence[JobStep], metrics: dict[str, Any]) -> str:
    """Per-layer numbers the job has: each matrix's relative weight error (in-memory engine), each block's output
    cosine (layer-by-layer engines) and a mixed-precision step's sensitivity scan."""
    parts = []
    if values := (metrics.get("layers") or {}).get("values"):
        parts.append(_layer_chart(values, "relative weight error", metrics["layers"].get("note")))
    if cosines := (metrics.get("after") or {}).get("block_output_cosines"):
        errors = {f"block {index}": 1 - cosine for index, cosine in enumerate(cosines)}
        parts.append(_layer_chart(errors, "1 - block output cosine", "each decoder block of the artifact vs the "
                                  "original's on a seeded random hidden state"))
    for step in steps:
        scan = {k.removeprefix("sensitivity/"): v for k, v in (step.metrics or {}).items()
                if k.startswith("sensitivity/")}
        if scan:
            parts.append(_layer_chart(scan, f"sensitivity ({_step_name(step)})",
                                      "output error with that weight alone quantized at that width"))
    return "<h2>Per layer</h2>" + "".join(parts) if parts else ""


def _bytes(breakdown: dict[str, Any] | None) -> str:
    if not breakdown:
        return ""
    parts = []
    for key, title in (("by_kind", "by tensor kind"), ("by_encoding", "by encoding")):
        found: dict[str, int] = breakdown.get(key) or {}
        total = sum(found.values()) or 1
        parts.append(_img(_bars_png(found, "bytes", f"Artifact bytes {title}"), f"artifact bytes {title}"))
        parts.append(_table([title.removeprefix("by ").capitalize(), "bytes", "share"],
                            [(name, _fmt(size), f"{100 * size / total:.1f}%") for name, size in found.items()]))
    return f"<h2>Where the bytes went</h2>{''.join(parts)}{_note(breakdown.get('note'))}"


def _notes(steps: Sequence[JobStep]) -> str:
    items = [f"<li><b>{html.escape(_step_name(step))}</b>: {html.escape(note)}</li>"
             for step in steps for note in step.notes or []]
    return f"<h2>Step notes</h2><ul>{''.join(items)}</ul>" if items else ""


# ---- charts ----------------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # only the report draws: the API starts without matplotlib loaded

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _waterfall_png(labels: list[str], sizes: list[int], values: list[float | None], quality: str) -> bytes:
    figure = _figure(8, 4)
    axes = figure.add_subplot()
    positions = range(len(labels))
    axes.bar(positions, [size / 1e6 for size in sizes], color="#4c78a8")
    axes.set_ylabel("weights (MB, as stored)")
    axes.set_xticks(list(positions), labels, rotation=20, ha="right")
    line = axes.twinx()
    line.plot(positions, [float("nan") if v is None else v for v in values], color="#e45756", marker="o")
    line.set_ylabel(quality, color="#e45756")
    axes.set_title("Size (bars) and quality (line) after each step")
    return _png(figure)


def _bars_png(values: Mapping[str, float], unit: str, title: str) -> bytes:
    figure = _figure(8, 0.8 + 0.28 * max(len(values), 1))
    axes = figure.add_subplot()
    names = list(values)[::-1]
    axes.barh(names, [values[name] for name in names], color="#54a24b")
    axes.set_xlabel(unit)
    axes.set_title(title)
    return _png(figure)


def _layer_chart(values: dict[str, float], label: str, note: str | None) -> str:
    largest = dict(sorted(values.items(), key=lambda item: -abs(item[1]))[:MAX_LAYER_BARS])
    shown = f"the {len(largest)} largest of {len(values)}" if len(largest) < len(values) else f"all {len(values)}"
    chart = _img(_bars_png(largest, label, f"{label}: {shown}"), f"per-layer {label}")
    rows = [(name, _fmt(value)) for name, value in values.items()]
    table = f"<details><summary>every layer ({len(values)})</summary>{_table(['layer', label], rows)}</details>"
    return f"<h3>{html.escape(label)}</h3>{chart}{table}{_note(note)}"


def _img(png: bytes, alt: str) -> str:
    return f"<img alt=\"{html.escape(alt)}\" src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">"


# ---- small helpers ---------------------------------------------------------------------------------------------


def _step_name(step: JobStep) -> str:
    method = step.config.get("method")
    return f"{step.index}: {step.type}" + (f"/{method}" if method else "")


def _quality_metric(record: dict[str, Any]) -> str:
    """The waterfall's quality line: the first evaluation metric when the job has `evaluate`, else the probe's
    output cosine."""
    return next(iter(record.get("quality") or {}), "output_cosine")


def _quality_value(record: dict[str, Any], metric: str, original: bool = False) -> float | None:
    if metric == "output_cosine":
        return 1.0 if original else record.get("output_cosine")
    measured: dict[str, float | None] = record["quality"][metric]
    return measured["original"] if original else measured["value"]


def _ratio(before: Any, after: Any) -> float | None:
    numbers = isinstance(before, int | float) and isinstance(after, int | float)
    return after / before if numbers and before else None


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or abs(value) >= 1e5:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _ci(interval: Sequence[float | None] | None) -> str:
    if not interval or interval[0] is None:
        return "—"
    return f"[{_fmt(interval[0])}, {_fmt(interval[1])}]"


def _note(text: Any) -> str:
    return f"<p class=\"note\">{html.escape(str(text))}</p>" if text else ""


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], header: bool = True) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"

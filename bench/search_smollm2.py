"""A search to a quality budget on SmolLM2-135M (issue 18's "Done when"), run through the real service: the API and
a Celery worker as child processes, the model and the evaluation text uploaded over HTTP, `POST /v1/searches`, and
every trial an ordinary job the worker runs (its completion path records the trial and submits the next one).

- Constraint: perplexity <= 1.10x the fp32 model's, on news text (the first NEWS_DOCS documents of gensim's
  lee_background.cor); trials and the sensitivity scan calibrate on the default corpus (Wikipedia articles), so the
  evaluation text is held out (each trial's overlap check says so).
- Objective: min_size, at most MAX_TRIALS trials, one at a time (one worker on this machine).
- Target: <= 0.20x the fp32 weight bytes; baseline: the smallest hand-made recipe in docs/benchmarks.md that meets
  the same constraint (rtn int8 per channel, 0.252x, PPL 1.001x: bench.quant_smollm2).
- The space: rtn at 4, 5, 6 and 8 bits, groups of 64 or 128, symmetric or not, the embedding and head included,
  up to 30% of the parameters kept at 8 bits by the scan's ranking. gptq is left out of this run: its calibration
  takes minutes per trial on 2 shared cores (the service's default space for causal LMs includes it).

Quality numbers only, no timings. Run (creates the database if missing):
    MCS_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/mcs_bench_search \\
        MCS_BROKER_URL=redis://127.0.0.1:6379/4 .venv/bin/python -m bench.search_smollm2 --out /tmp/bench-search.md
Exits 1 when a check fails. `--screenshot FILE` saves the search report, opened in headless Chromium, there.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.report import load_average, machine_description, markdown_table, update_section
from bench.service import checked, create_key, ensure_database, running, stack_env, uvicorn_command
from bench.smollm2 import smollm2_folder
from cli.stack import free_port
from core.compression.shipped import package_dir

NAME = "search_smollm2"
COMMAND = ("MCS_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/mcs_bench_search "
           "MCS_BROKER_URL=redis://127.0.0.1:6379/4 .venv/bin/python -m bench.search_smollm2")
NEWS_DOCS = 16  # lee_background.cor documents: ~3,700 SmolLM2 tokens, 7 perplexity windows of 512
MAX_TRIALS = 12
MAX_RATIO = 1.10
TARGET = 0.20
BASELINE = ("rtn int8 per channel (bench.quant_smollm2)", 0.252)
SPACE = {"methods": ["rtn"], "bits": [4, 5, 6, 8], "group_sizes": [64, 128], "symmetric": [True, False],
         "presets": [], "max_protect_share": 0.3, "include_head": True,
         "scan_calibration": {"num_samples": 4, "seq_len": 64}}


@dataclass(frozen=True)
class Target:
    """What differs between the searches this module runs: the model, the held-out rows, the constraint."""

    name: str  # the docs/benchmarks.md section
    command: str
    title: str
    folder: Callable[[], Path]
    model_name: str
    rows: Callable[[int], list[dict[str, Any]]]  # the evaluation rows, given --news-docs
    metric: str  # the evaluation metric the constraint reads
    constraint: dict[str, Any]
    constraint_text: str
    evaluation_text: str
    space: dict[str, Any]
    target: float
    baseline: tuple[str, float]


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def news_rows(documents: int) -> list[dict[str, Any]]:
    path = package_dir("gensim") / "test" / "test_data" / "lee_background.cor"
    lines = path.read_text(encoding="latin-1").splitlines()
    return [{"text": line.strip()} for line in lines if line.strip()][:documents]


def upload(api: httpx.Client, folder: Path, rows: list[dict[str, Any]], scratch: Path,
           model_name: str = "SmolLM2-135M-Instruct") -> tuple[str, str]:
    archive = scratch / "model.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as handle:
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                handle.write(path, path.name)
    with archive.open("rb") as handle:
        model = checked(api.post("/v1/models", files={"file": ("model.zip", handle, "application/zip")},
                                 data={"name": model_name}))
    payload = "\n".join(json.dumps(row) for row in rows).encode()
    dataset = checked(api.post("/v1/datasets", files={"file": ("held-out.jsonl", payload,
                                                                "application/octet-stream")}))
    return model["id"], dataset["id"]


def run(api: httpx.Client, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    target: Target = args.target
    rows = target.rows(args.news_docs)
    model_id, dataset_id = upload(api, target.folder(), rows, scratch, target.model_name)
    body = {"model_id": model_id, "objective": "min_size", "constraint": target.constraint,
            "evaluate": {"dataset_id": dataset_id, "metrics": [target.metric], "max_samples": len(rows)},
            "space": space(args), "budget": {"max_trials": args.trials}, "parallelism": 1}
    search = checked(api.post("/v1/searches", json=body))
    while search["status"] == "running":
        time.sleep(5)
        search = checked(api.get(f"/v1/searches/{search['id']}"))
        print(f"{len(search['trials'])} trials, best {(search['best'] or {}).get('size_ratio')}", file=sys.stderr)
    report = api.get(f"/v1/searches/{search['id']}/report").text
    if args.screenshot:
        screenshot(report, args.screenshot)
    return {"search": search, "load": load_average(), "machine": machine_description()}


def space(args: argparse.Namespace) -> dict[str, Any]:
    """The space; `--smoke` scans fewer widths on fewer tokens (the scan is one forward per weight and width)."""
    full: dict[str, Any] = args.target.space
    if not args.smoke:
        return full
    return {**full, "bits": [4, 6, 8], "scan_calibration": {"num_samples": 1, "seq_len": 32}}


def screenshot(page_html: str, target: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.route("**/*", lambda route: route.fulfill(status=200, body=page_html, content_type="text/html")
                   if route.request.url == "http://mcs.test/" else route.abort())
        page.goto("http://mcs.test/", wait_until="load")
        page.screenshot(path=str(target), full_page=True)
        browser.close()


def checks(result: dict[str, Any], target: Target) -> dict[str, bool]:
    best = result["search"]["best"] or {}
    size = best.get("size_ratio") or 1.0
    return {f"a recipe meeting {target.constraint_text} within {MAX_TRIALS} trials": bool(best),
            f"its size <= {target.target}x the fp32 weight bytes": size <= target.target,
            f"at least as small as the baseline ({target.baseline[0]}, {target.baseline[1]}x)":
                size <= target.baseline[1]}


def section(result: dict[str, Any], args: argparse.Namespace) -> str:
    target: Target = args.target
    search = result["search"]
    rows = [(t["number"], _label(t), len(t.get("protected") or []), _num(t.get("size_ratio")),
             _num(t.get("value")), _ci(t.get("ci95")), {True: "yes", False: "no"}.get(t.get("feasible"), "—"))
            for t in search["trials"]]
    original = next((t["evaluation"]["original"] for t in search["trials"] if t.get("evaluation")), None)
    best = search["best"] or {}
    protect_bits = space(args).get("protect_bits", 8)
    lines = [
        f"## {target.title}",
        "",
        f"Reproduce: `{target.command}`",
        "",
        f"Machine: {result['machine']}; load average at the end {result['load']} (other jobs shared the CPU).",
        "",
        f"`POST /v1/searches` through the API and one Celery worker; evaluation: "
        f"{target.evaluation_text.format(rows=args.news_docs, original=_num(original))}; calibration of the scan: "
        "the default corpus (Wikipedia), held out from the evaluation rows. Trial 0 is the sensitivity scan (mixed "
        "precision); later trials come from optuna's TPE (seeded) with the scan's most sensitive weights kept at "
        f"{protect_bits} bits.",
        "",
        markdown_table(["trial", "recipe", f"weights at {protect_bits} bits", "size vs fp32",
                        f"{target.metric} (constrained)", "95% CI", "met"], rows),
        "",
        *[f"- {name}: {'met' if ok else 'NOT met'}" for name, ok in checks(result, target).items()],
        "",
        f"Best recipe (trial {best.get('number')}, {_num(best.get('size_ratio'))}x, {target.metric} "
        f"{_num(best.get('value'))}): `{json.dumps(best.get('steps'))}`",
        "",
        f"Space: `{json.dumps(space(args))}`" + (" (SMOKE RUN: not the full benchmark)" if args.smoke else ""),
    ]
    return "\n".join(lines)


def _label(trial: dict[str, Any]) -> str:
    params = trial["params"]
    if params.get("family") != "grid":
        return str(params.get("family"))
    group = params.get("group_size")
    return (f"{params['method']} int{params['bits']} " + (f"g{group}" if group else "per channel")
            + (" sym" if params["symmetric"] else " asym") + (f", protect {params['protect']:.0%}"
                                                              if params.get("protect") else ""))


def _num(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}"


def _ci(interval: Any) -> str:
    return "—" if not interval or interval[0] is None else f"[{interval[0]:.4g}, {interval[1]:.4g}]"


SMOLLM2 = Target(
    name=NAME, command=COMMAND, title="Search to a quality budget: SmolLM2-135M, PPL <= 1.10x fp32, smallest recipe",
    folder=smollm2_folder, model_name="SmolLM2-135M-Instruct", rows=news_rows, metric="perplexity",
    constraint={"metric": "perplexity", "max_ratio": MAX_RATIO}, constraint_text=f"PPL <= {MAX_RATIO}x fp32",
    evaluation_text="perplexity on the first {rows} news documents of lee_background.cor (fp32 PPL {original})",
    space=SPACE, target=TARGET, baseline=BASELINE)


def main(target: Target = SMOLLM2, rows_default: int = NEWS_DOCS, doc: str | None = None) -> int:
    parser = argparse.ArgumentParser(description=doc or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--news-docs", type=int, default=rows_default, help="evaluation rows")
    parser.add_argument("--trials", type=int, default=MAX_TRIALS)
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="a cheap run: fewer widths scanned on 32 tokens "
                        "(use with --trials and --news-docs); its numbers do not stand for the full run")
    parser.add_argument("--out", type=Path, default=None, help="write the section here, not docs/benchmarks.md")
    parser.add_argument("--json", type=Path, default=None, help="also save the raw results here")
    parser.add_argument("--from-json", type=Path, default=None, help="write the section from saved raw results")
    args = parser.parse_args()
    args.target = target
    result = json.loads(args.from_json.read_text()) if args.from_json else measured(args)
    body = section(result, args)
    update_section(target.name, body, *([args.out] if args.out else []))
    print(body)
    return 0 if all(checks(result, target).values()) else 1


def measured(args: argparse.Namespace) -> dict[str, Any]:
    database, broker = os.environ.get("MCS_DATABASE_URL", ""), os.environ.get("MCS_BROKER_URL", "")
    if not database.startswith("postgresql") or not broker:
        raise SystemExit("set MCS_DATABASE_URL (PostgreSQL) and MCS_BROKER_URL (Redis); see the docstring")
    ensure_database(database)
    with tempfile.TemporaryDirectory(prefix="mcs-bench-search-") as tmp:
        root = Path(tmp)
        env = {**stack_env(root), "OMP_NUM_THREADS": "2"}
        key = create_key(env)
        worker = [sys.executable, "-m", "cli.main", "worker", "--queues", "cpu", "--concurrency", "1"]
        with running({"api": uvicorn_command("api.main:app", free_port(), 1), "worker": worker}, env,
                     root / "logs") as stack, \
                httpx.Client(base_url=stack["url"], headers={"Authorization": f"Bearer {key}"}, timeout=600) as api:
            result = run(api, args, root)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    sys.exit(main())

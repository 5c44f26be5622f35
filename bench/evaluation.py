"""Evaluation on real held-out data (issue 18's "Done when"), run through the real service: the API and a Celery
worker as child processes, models and datasets uploaded over HTTP, jobs with `"evaluate"` and standalone
`POST /v1/evaluations`, so every number comes from the worker's `execute_job` / `evaluate_standalone` and
core.compression.evaluate (artifact loaded back from disk, paired bootstrap CIs, overlap check).

- SmolLM2-135M: perplexity on gensim's lee_background.cor news (the first NEWS_DOCS documents; the presets calibrate
  on the default corpus, Wikipedia, so the evaluation text is held out and the overlap check says so), fp32 vs the
  w8a16-rtn and w4a16-gptq presets.
- Sentiment: the 200 labelled review sentences of pang_lee_polarity.cor as a two-choice task for SmolLM2
  (`POST /v1/evaluations` on each job's artifact).
- all-MiniLM-L6-v2: STS Spearman on the 1,225 human-rated pairs of lee.cor + similarities0-1.txt, fp32 vs the
  w8a16-rtn preset and gptq int4 g64.
- Overlap: a job whose evaluation dataset is its calibration dataset is refused (422), as is a standalone evaluation
  of it; the same texts uploaded as a second dataset run and are flagged.
- Deep compression (prune 50% -> distill -> kmeans 4-bit -> huffman) on MiniLM, evaluated on the STS pairs; its
  report (`GET /v1/jobs/{id}/report`) opened in headless Chromium, every chart checked and screenshotted.

`--streamed`: instead, the memory of evaluating a model too big to hold (its own section): a synthetic Llama
(TinyLlama widths, STREAM_LAYERS blocks, SmolLM2's tokenizer, random bf16 weights) and its rtn int8 artifact from a
layer-by-layer job, evaluated by `evaluate_standalone` (what `POST /v1/evaluations` runs) with perplexity, accuracy and
generation agreement, once streamed (one block in memory at a time, as every job over MCS_STREAM_ABOVE_BYTES) and
once loaded, each in a child process whose peak RSS is sampled. No service needed:
    .venv/bin/python -m bench.evaluation --streamed

Quality numbers only, no timings. Run (creates the database if missing). CPU work is dominated by SmolLM2's
forward passes (sentiment: rows x 2 choices x ~47 tokens per model, each evaluation measures fp32 and the artifact);
with `--news-docs 24 --gptq-samples 16 --reviews 100` it took 42 min at a load average of 12 on 2 cores:
    MCS_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/mcs_bench_evaluation \\
        MCS_BROKER_URL=redis://127.0.0.1:6379/3 .venv/bin/python -m bench.evaluation
`--out FILE` writes the section there instead of docs/benchmarks.md. Exits 1 when a check fails.
"""

import argparse
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import httpx

from bench.report import load_average, machine_description, markdown_table, update_section
from bench.service import checked, create_key, ensure_database, running, stack_env, uvicorn_command, wait_job
from bench.smollm2 import smollm2_folder
from cli.stack import free_port
from core.compression.shipped import minilm_folder, package_dir

NAME = "evaluation"
COMMAND = ("MCS_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/mcs_bench_evaluation "
           "MCS_BROKER_URL=redis://127.0.0.1:6379/3 .venv/bin/python -m bench.evaluation")
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "report-deep-compression.png"
STREAM_COMMAND = ".venv/bin/python -m bench.evaluation --streamed"
STREAM_LAYERS = 4  # TinyLlama widths with SmolLM2's 49,152-token vocabulary: 0.38 B parameters, 0.75 GB in bf16
NEWS_DOCS = 64  # lee_background.cor documents: 14,896 SmolLM2 tokens, 30 perplexity windows of 512
GPTQ_SAMPLES = 32  # w4a16-gptq's calibration windows (the preset's 64, with its scale tuning, take ~15 min here)
CHOICES = ["negative", "positive"]
# Four hand-written shots, none from the evaluated file (so no evaluated row is also a prompt's example): zero-shot
# ("Is this movie review positive or negative?") SmolLM2-135M always answered "negative" (0.50 on balanced rows);
# with these shots fp32 scores 0.85 on the 200 rows.
REVIEW_SHOTS = [("A warm, funny and beautifully acted film that stays with you.", "positive"),
                ("The plot is a mess and the jokes fall flat; a tedious two hours.", "negative"),
                ("One of the most moving and intelligent movies of the year.", "positive"),
                ("Dull, lifeless and badly written, it never finds a reason to exist.", "negative")]
REVIEW_PROMPT = "".join(f"Review: {shot}\nSentiment: {label}\n\n" for shot, label in REVIEW_SHOTS) + \
    "Review: {sentence}\nSentiment:"
GPTQ_MINILM = {"type": "quantize", "method": "gptq", "bits": 4, "granularity": "per_group", "group_size": 64,
               "symmetric": False, "calibration": {"num_samples": 64, "seq_len": 128}}  # bench.quant_minilm's best
# Deep Compression on MiniLM (bench.distill_minilm's chain, one short distill instead of three long ones).
DEEP = [{"type": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global", "include_embeddings": True,
         "exclude": ["embeddings.position_embeddings", "embeddings.token_type_embeddings"]},
        {"type": "distill", "max_steps": 300, "train_embeddings": True, "lr": 7e-4, "batch_size": 8, "seq_len": 32,
         "checkpoint_every": 100_000, "loss": {"hidden_mse": 1.0}},
        {"type": "quantize", "method": "kmeans", "bits": 4, "granularity": "per_channel",
         "targets": ["*.intermediate.dense", "*.output.dense"], "exclude": ["*.attention.*"]},
        {"type": "quantize", "method": "kmeans", "bits": 4, "granularity": "per_column",
         "targets": ["embeddings.word_embeddings", "embeddings.position_embeddings"]},
        {"type": "quantize", "method": "kmeans", "bits": 4, "granularity": "per_tensor",
         "targets": ["embeddings.token_type_embeddings", "*.attention.*", "pooler.*"]},
        {"type": "encode", "method": "huffman"}]
# tests/fixtures/browser.py's flags: headless, no sandbox (root in a container), nothing that reaches the network
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
OVERLAP_STEP = {"type": "quantize", "method": "gptq", "bits": 4, "granularity": "per_group", "group_size": 64,
                "symmetric": False, "calibration": {"num_samples": 8, "seq_len": 128}}


# ---- data ------------------------------------------------------------------------------------------------------


def gensim_file(name: str) -> Path:
    return package_dir("gensim") / "test" / "test_data" / name


def news_rows(documents: int) -> list[dict[str, Any]]:
    """The first `documents` news documents of lee_background.cor, one row each (perplexity joins them)."""
    lines = gensim_file("lee_background.cor").read_text(encoding="latin-1").splitlines()
    return [{"text": line.strip()} for line in lines if line.strip()][:documents]


def review_sentences() -> list[tuple[str, int]]:
    """(sentence, 1 for positive) of the 200 labelled review sentences."""
    rows = []
    for line in gensim_file("pang_lee_polarity.cor").read_text(encoding="latin-1").splitlines():
        label, _, sentence = line.strip().partition(" ")
        rows.append((sentence.strip(), int(label == "__label__pos")))
    return rows


def alternating_reviews() -> list[tuple[str, int]]:
    """The 200 sentences, negative and positive alternating (the file lists the 100 negative ones first), so that
    the first N rows (`max_samples`) are balanced."""
    reviews = review_sentences()
    return [row for pair in zip(reviews[:100], reviews[100:], strict=True) for row in pair]


def sentiment_rows() -> list[dict[str, Any]]:
    """The 200 sentences as two-choice rows, balanced in any prefix (`alternating_reviews`)."""
    return [{"question": REVIEW_PROMPT.format(sentence=sentence), "choices": CHOICES, "answer": label}
            for sentence, label in alternating_reviews()]


def sts_rows() -> list[dict[str, Any]]:
    """The 1,225 document pairs of lee.cor (50 documents) with their mean human similarity rating (the upper
    triangle of similarities0-1.txt)."""
    documents = [line.strip() for line in gensim_file("lee.cor").read_text(encoding="latin-1").splitlines()]
    ratings = [[float(value) for value in line.split()]
               for line in gensim_file("similarities0-1.txt").read_text().splitlines() if line.strip()]
    return [{"text": documents[i], "text_pair": documents[j], "score": ratings[i][j]}
            for i in range(len(documents)) for j in range(i + 1, len(documents))]


# ---- the service -----------------------------------------------------------------------------------------------


def model_zip(folder: Path, target: Path) -> Path:
    """The folder's files (no hidden ones) in a stored zip: the API takes an archive of a model folder."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                archive.write(path, path.name)
    return target


def upload_model(api: httpx.Client, folder: Path, name: str, scratch: Path) -> str:
    path = model_zip(folder, scratch / f"{name}.zip")
    with path.open("rb") as handle:
        model = checked(api.post("/v1/models", files={"file": (path.name, handle, "application/zip")},
                                 data={"name": name}))
    path.unlink()
    return str(model["id"])


def upload_rows(api: httpx.Client, rows: list[dict[str, Any]], name: str) -> str:
    payload = "\n".join(json.dumps(row) for row in rows).encode()
    dataset = checked(api.post("/v1/datasets", files={"file": (f"{name}.jsonl", payload, "application/octet-stream")}))
    return str(dataset["id"])


def submit(api: httpx.Client, body: dict[str, Any]) -> str:
    return str(checked(api.post("/v1/jobs", json=body))["id"])


def finished(api: httpx.Client, job_id: str) -> dict[str, Any]:
    job = wait_job(api, job_id, poll_s=2.0, timeout_s=3600)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
    return job


def refused(response: httpx.Response) -> dict[str, Any]:
    """The status and error body of a request the service must refuse."""
    return {"status": response.status_code, "error": response.json().get("error", response.json())}


# ---- the runs --------------------------------------------------------------------------------------------------


def run(api: httpx.Client, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Upload, submit every job (the worker runs them two at a time), then gather the results. The SmolLM2 jobs
    carry no `evaluate` (its per-step waterfall would measure the 135M model twice more on the news text): their
    artifacts are measured by `POST /v1/evaluations`, perplexity and sentiment accuracy against the original each.
    The MiniLM jobs carry `evaluate` (STS), so their waterfall and report have it."""
    smollm2 = upload_model(api, smollm2_folder(), "SmolLM2-135M-Instruct (fp32)", scratch)
    minilm = upload_model(api, minilm_folder(), "all-MiniLM-L6-v2", scratch)
    news, sentiment = upload_rows(api, news_rows(args.news_docs), "news"), upload_rows(api, sentiment_rows(), "reviews")
    sts = upload_rows(api, sts_rows(), "lee-sts")
    calibration = upload_rows(api, [{"text": text} for text, _ in review_sentences()], "calibration")
    same_texts = upload_rows(api, [{"text": text} for text, _ in review_sentences()], "calibration-again")
    stsspec = {"dataset_id": sts, "metrics": ["sts_spearman"], "max_samples": 10_000}
    gptq = {"calibration": {"num_samples": args.gptq_samples}}
    jobs = {
        "w8a16-rtn": submit(api, {"model_id": smollm2, "preset": "w8a16-rtn"}),
        "w4a16-gptq": submit(api, {"model_id": smollm2, "preset": "w4a16-gptq", "overrides": gptq}),
        "minilm w8a16-rtn": submit(api, {"model_id": minilm, "preset": "w8a16-rtn", "evaluate": stsspec}),
        "minilm gptq int4 g64": submit(api, {"model_id": minilm, "steps": [GPTQ_MINILM], "evaluate": stsspec}),
        "overlap": submit(api, {"model_id": minilm, "steps": [_calibrated_on(calibration)],
                                "evaluate": {"dataset_id": same_texts, "metrics": ["embedding_cosine"]}}),
        "deep": submit(api, {"model_id": minilm, "steps": DEEP, "evaluate": stsspec}),
    }
    refusal = api.post("/v1/jobs", json={"model_id": minilm, "steps": [_calibrated_on(calibration)],
                                         "evaluate": {"dataset_id": calibration, "metrics": ["embedding_cosine"]}})
    done = {name: finished(api, job_id) for name, job_id in jobs.items() if not name.startswith("minilm")}
    evaluations = {"perplexity": {"dataset_id": news, "metrics": ["perplexity"], "max_samples": args.news_docs},
                   "accuracy": {"dataset_id": sentiment, "metrics": ["accuracy"], "max_samples": args.reviews}}
    submitted = {(name, metric): submit_evaluation(api, done[name]["id"], spec)
                 for name in ("w8a16-rtn", "w4a16-gptq") for metric, spec in evaluations.items()}
    done.update({name: finished(api, job_id) for name, job_id in jobs.items() if name not in done})
    standalone_refusal = api.post("/v1/evaluations", json={
        "job_id": done["overlap"]["id"], "evaluate": {"dataset_id": calibration, "metrics": ["embedding_cosine"]}})
    report = screenshot_report(api, done["deep"]["id"], args.screenshot)
    measured: dict[str, Any] = {name: {} for name in ("w8a16-rtn", "w4a16-gptq")}
    for (name, metric), evaluation_id in submitted.items():
        finished(api, evaluation_id)
        measured[name][metric] = checked(api.get(f"/v1/evaluations/{evaluation_id}"))
    return {"jobs": done, "smollm2": measured, "refusal": refused(refusal),
            "standalone_refusal": refused(standalone_refusal), "report": report}


def submit_evaluation(api: httpx.Client, job_id: str, evaluate: dict[str, Any]) -> str:
    """`POST /v1/evaluations` of the job's artifact against its original."""
    return str(checked(api.post("/v1/evaluations", json={"job_id": job_id, "evaluate": evaluate}))["id"])


def _calibrated_on(dataset_id: str) -> dict[str, Any]:
    return {**OVERLAP_STEP, "calibration": {**OVERLAP_STEP["calibration"], "dataset_id": dataset_id}}


def screenshot_report(api: httpx.Client, job_id: str, target: Path) -> dict[str, Any]:
    """Open the job's report in headless Chromium (Debian's, as tests/fixtures/browser.py does) from a made-up
    origin that refuses every other request; count the charts that drew, the console errors and the requests the
    page tried, and save a full-page screenshot."""
    from playwright.sync_api import sync_playwright

    response = api.get(f"/v1/jobs/{job_id}/report")
    response.raise_for_status()
    url, errors, requested = "http://mcs.test/report", [], []

    def serve(route: Any) -> None:
        if route.request.url == url:
            route.fulfill(status=200, body=response.text, content_type="text/html",
                          headers={"Content-Security-Policy": response.headers["content-security-policy"]})
        else:
            requested.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.route("**/*", serve)
        page.goto(url, wait_until="load")
        images = page.eval_on_selector_all(
            "img", "imgs => imgs.map(i => ({alt: i.alt, ok: i.complete && i.naturalWidth > 0 && i.clientWidth > 0}))")
        target.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(target), full_page=True)
        browser.close()
    return {"charts": len(images), "drawn": sum(image["ok"] for image in images),
            "alts": [image["alt"] for image in images], "console_errors": errors, "requests": requested,
            "screenshot": str(target), "html_bytes": len(response.content)}


# ---- the section -----------------------------------------------------------------------------------------------


def interval(values: list[float | None] | None, digits: int = 3) -> str:
    if not values or values[0] is None or values[1] is None:
        return "—"
    return f"[{values[0]:+.{digits}f}, {values[1]:+.{digits}f}]"


def size_ratio(job: dict[str, Any]) -> str:
    return f"{job['metrics']['size_ratio']:.3f}×"


def smollm2_metric(result: dict[str, Any], name: str, metric: str) -> dict[str, Any]:
    return dict(result["smollm2"][name][metric]["result"]["metrics"][metric])


def perplexity_table(result: dict[str, Any]) -> str:
    first = smollm2_metric(result, "w8a16-rtn", "perplexity")
    rows = [["fp32", "1.000×", f"{first['original']:.3f}", "—", "—"]]
    for name in ("w8a16-rtn", "w4a16-gptq"):
        measured = smollm2_metric(result, name, "perplexity")
        rows.append([name, size_ratio(result["jobs"][name]), f"{measured['artifact']:.3f}",
                     f"{measured['delta']:+.3f} {interval(measured['ci95'])}",
                     f"{measured['ratio']:.4f}× {interval([v - 1 if v else None for v in measured['ratio_ci95']], 4)}"])
    return markdown_table(["variant", "weights vs fp32", "PPL", "ΔPPL [95% CI]", "PPL ratio [CI of ratio − 1]"], rows)


def sentiment_table(result: dict[str, Any]) -> str:
    first = smollm2_metric(result, "w8a16-rtn", "accuracy")
    rows = [["fp32", f"{first['original']:.3f}", "—", str(first["n"])]]
    labels = {"w8a16-rtn": "int8 (w8a16-rtn)", "w4a16-gptq": "gptq int4 (w4a16-gptq)"}
    for name, label in labels.items():
        measured = smollm2_metric(result, name, "accuracy")
        rows.append([label, f"{measured['artifact']:.3f}", f"{measured['delta']:+.3f} {interval(measured['ci95'])}",
                     str(measured["n"])])
    return markdown_table(["variant", "accuracy", "Δ accuracy [95% CI]", "rows"], rows)


def sts_table(jobs: dict[str, Any]) -> str:
    first = jobs["minilm w8a16-rtn"]["metrics"]["evaluation"]["metrics"]["sts_spearman"]
    rows = [["fp32", "1.000×", f"{first['original']:.4f}", "—"]]
    for name, label in (("minilm w8a16-rtn", "int8 (w8a16-rtn)"), ("minilm gptq int4 g64", "gptq int4 g64"),
                        ("deep", "deep compression (below)")):
        measured = jobs[name]["metrics"]["evaluation"]["metrics"]["sts_spearman"]
        rows.append([label, size_ratio(jobs[name]), f"{measured['artifact']:.4f}",
                     f"{measured['delta']:+.4f} {interval(measured['ci95'], 4)}"])
    return markdown_table(["variant", "weights vs fp32", "Spearman ρ", "Δρ [95% CI]"], rows)


def checks(result: dict[str, Any]) -> dict[str, bool]:
    jobs, report = result["jobs"], result["report"]
    overlap = jobs["overlap"]["metrics"]["evaluation"]["overlap"]
    news = result["smollm2"]["w4a16-gptq"]["perplexity"]["result"]["overlap"]
    measured = [job["metrics"]["evaluation"]["metrics"] for job in jobs.values() if "evaluation" in job["metrics"]]
    measured += [run["result"]["metrics"] for runs in result["smollm2"].values() for run in runs.values()]
    return {
        "news windows share no 13-token span with the calibration text": news["token_spans"]["windows"] == 0,
        "every delta has a CI": all(m["ci95"][0] is not None for metrics in measured for m in metrics.values()),
        "evaluating on the calibration dataset is refused (job and standalone)":
            result["refusal"]["status"] == 422 == result["standalone_refusal"]["status"],
        "the same texts uploaded again are flagged": overlap["count"] == 200 and bool(jobs["overlap"]["metrics"].get(
            "warnings")),
        "report: every chart drawn, no console error, nothing fetched":
            report["charts"] > 0 and report["drawn"] == report["charts"] and not report["console_errors"]
            and not report["requests"],
    }


def section(result: dict[str, Any], args: argparse.Namespace) -> str:
    jobs = result["jobs"]
    news = result["smollm2"]["w4a16-gptq"]["perplexity"]["result"]
    ppl = news["metrics"]["perplexity"]
    overlap_job = jobs["overlap"]["metrics"]
    deep = jobs["deep"]
    report = result["report"]
    passed = checks(result)
    chance = abs(smollm2_metric(result, "w8a16-rtn", "accuracy")["original"] - 0.5) < 0.05
    lines = [
        "## Evaluation on held-out data: deltas with paired-bootstrap CIs, the overlap check, the report",
        "",
        f"Reproduce: `{command(args)}`",
        "",
        f"Machine: {machine_description()}; the worker ran two jobs at a time with one torch thread each; load "
        f"average at the end: {load_average()}.",
        "",
        "Every number comes from the service: the models and datasets uploaded over HTTP, jobs run by a Celery "
        "worker (`execute_job`; the MiniLM jobs with `\"evaluate\"`), SmolLM2's artifacts measured by "
        "`POST /v1/evaluations` with each job's `job_id` (`evaluate_standalone`), every artifact loaded back from "
        "disk. CIs: paired percentile bootstrap, "
        f"{news['bootstrap']['resamples']} resamples, seed {news['bootstrap']['seed']}, the same resampled indices "
        "for both models. Quality only; no timings.",
        "",
        f"### SmolLM2-135M: perplexity on news text ({args.news_docs} documents of lee_background.cor, "
        f"{ppl['n_tokens']:,} tokens, {ppl['n']} windows of 512)",
        "",
        perplexity_table(result),
        "",
        f"- Held out: the presets calibrate on the default corpus (Wikipedia articles); the overlap check compared "
        f"{news['overlap']['compared_with']} with the evaluation rows: {news['overlap']['count']} equal rows, "
        f"{news['overlap']['token_spans']['windows']} of {news['overlap']['token_spans']['of']} windows share a "
        f"{news['overlap']['token_spans']['span_tokens']}-token span.",
        f"- w4a16-gptq ran with `\"overrides\": {{\"calibration\": {{\"num_samples\": {args.gptq_samples}}}}}` "
        f"({args.gptq_samples} × 512 calibration tokens instead of the preset's 64 × 512; bench.presets_api "
        "measures the preset as it is through the API on the first 4,096 tokens of the same file). The sentiment "
        "rows below show what the 4-bit model loses beyond perplexity.",
        "",
        f"### SmolLM2-135M: sentiment as a multiple-choice task ({args.reviews} of the 200 labelled review "
        "sentences of pang_lee_polarity.cor, half of them positive)",
        "",
        sentiment_table(result),
        "",
        f"- Each row: `{{\"question\": {json.dumps(REVIEW_PROMPT)}, \"choices\": {json.dumps(CHOICES)}, "
        "\"answer\": 0|1}` (four hand-written example reviews, none from the evaluated file, then the sentence); "
        "the choice with the higher summed log-likelihood after the question wins "
        "(lm-evaluation-harness's `acc`). Rows alternate negative and positive, so the first N are balanced.",
        *(["- fp32 is at chance on these balanced rows: the 135M model does not tell the two apart with this "
           "prompt, so these deltas say little about what quantization costs."] if chance else []),
        "",
        "### all-MiniLM-L6-v2: STS Spearman on the 1,225 human-rated pairs of lee.cor + similarities0-1.txt",
        "",
        sts_table(jobs),
        "",
        "- Rows `{\"text\", \"text_pair\", \"score\"}`: every pair (i < j) of lee.cor's 50 documents with its mean "
        "human rating; Spearman of the embeddings' cosine with the ratings, CI by resampling pairs. Each distinct "
        "document is embedded once (50 forward passes, not 2,450).",
        f"- gptq int4 g64: `{json.dumps(GPTQ_MINILM)}`.",
        "",
        "### Overlap: evaluating on the calibration data",
        "",
        f"- A job whose `evaluate.dataset_id` is its gptq step's calibration dataset: "
        f"**{result['refusal']['status']}** `{json.dumps(result['refusal']['error'])[:300]}…`",
        f"- `POST /v1/evaluations` of a finished job on its calibration dataset: "
        f"**{result['standalone_refusal']['status']}** `{json.dumps(result['standalone_refusal']['error'])[:300]}…`",
        f"- The same 200 review sentences uploaded as a second dataset: the job runs and is flagged. "
        f"`metrics.warnings`: `{overlap_job.get('warnings')}`; `evaluation.overlap`: count "
        f"{overlap_job['evaluation']['overlap']['count']}, fraction {overlap_job['evaluation']['overlap']['fraction']}"
        f", datasets {overlap_job['evaluation']['overlap']['datasets']}.",
        "",
        "### Deep compression on all-MiniLM-L6-v2 and its report",
        "",
        f"Recipe (prune 50% → distill {DEEP[1]['max_steps']} steps → kmeans 4-bit in three groups → huffman): "
        f"`{json.dumps(DEEP)}`",
        "",
        f"- Weights {deep['metrics']['before']['size_bytes']:,} → {deep['metrics']['after']['size_bytes']:,} bytes "
        f"({size_ratio(deep)}); STS Spearman in the table above.",
        f"- `GET /v1/jobs/{{id}}/report` ({report['html_bytes']:,} bytes of HTML) opened in headless Chromium: "
        f"{report['drawn']} of {report['charts']} charts drawn ({', '.join(report['alts'])}), "
        f"{len(report['console_errors'])} console errors, {len(report['requests'])} requests attempted.",
        "",
        "![The report of the deep-compression job](img/report-deep-compression.png)",
        "",
        *[f"- {name}: {'met' if ok else 'NOT met'}" for name, ok in passed.items()],
    ]
    return "\n".join(lines)


# ---- a model too big to hold: the streamed evaluation's memory ---------------------------------------------------


def streamed_check(scratch: Path) -> dict[str, Any]:
    """Write the synthetic model, compress it layer by layer (rtn int8, the worker's `execute_job`), then evaluate
    the artifact against it in a child process per engine; their peak RSS beside the weights' sizes."""
    import shutil

    from bench.big_models import TINYLLAMA, measured_child, write_synthetic_llama
    from core.compression.execute import execute_job
    from core.compression.pipeline import StepHooks
    from core.compression.spec import JobSpec
    from core.compression.state import StepContext

    source = scratch / "llama"
    parameters = write_synthetic_llama(source, STREAM_LAYERS, {**TINYLLAMA, "vocab_size": 49152})
    for tokenizer_file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_folder() / tokenizer_file, source / tokenizer_file)
    spec = JobSpec.model_validate({"steps": [{"type": "quantize", "method": "rtn", "bits": 8}]})
    outcome = execute_job(source, spec, scratch / "job", StepContext(), StepHooks(), {}, stream_above_bytes=0)
    runs = {engine: measured_child([sys.executable, "-m", f"bench.{NAME}", "--child", engine, str(source),
                                    str(outcome.artifact), str(scratch / engine)], engine)
            for engine in ("layer_by_layer", "in_memory")}
    return {"parameters": parameters, "bf16_bytes": 2 * parameters, "fp32_bytes": 4 * parameters,
            "artifact_bytes": outcome.metrics["after"]["size_bytes"], "runs": runs}


def streamed_child(engine: str, source: Path, artifact: Path, work: Path) -> None:
    """In the child: `evaluate_standalone` of the artifact against the source, streamed (threshold 0) or loaded
    (no threshold); one JSON line with the result's engine and metrics."""
    import psutil

    from core.compression.evaluate import EvaluationRequest
    from core.compression.execute import evaluate_standalone
    from core.compression.state import StepContext

    # Two requests, so that each metric sees few rows (a greedy continuation is 17 passes over every block):
    # perplexity and generation agreement on one news document, accuracy on 4 review rows.
    requests = [EvaluationRequest("news", ("perplexity", "generation_agreement"), news_rows(1), {}),
                EvaluationRequest("reviews", ("accuracy",), sentiment_rows()[:4], {})]
    imports = psutil.Process().memory_info().rss
    measured, engines = {}, set()
    for request in requests:
        result = evaluate_standalone(source, artifact, request, work, StepContext(),
                                     0 if engine == "layer_by_layer" else None)
        engines.add(result["engine"])
        measured.update({name: {key: value for key, value in found.items() if key != "note"}
                         for name, found in result["metrics"].items()})
    print(json.dumps({"engine": ", ".join(sorted(engines)), "rss_after_imports": imports, "metrics": measured}))


def streamed_section(result: dict[str, Any]) -> str:
    gib = 1024**3
    rows = [[engine, run["engine"], f"{run['peak_rss'] / gib:.2f}", f"{run['rss_after_imports'] / gib:.2f}",
             f"{run['peak_rss'] / result['fp32_bytes']:.2f}×",
             f"{run['metrics']['perplexity']['delta']:+.3g}", f"{run['metrics']['accuracy']['delta']:+.3g}",
             f"{run['metrics']['generation_agreement']['artifact']:.3f}"]
            for engine, run in result["runs"].items()]
    streamed, loaded = result["runs"]["layer_by_layer"], result["runs"]["in_memory"]
    same = all(close(streamed["metrics"][m]["delta"], loaded["metrics"][m]["delta"]) for m in streamed["metrics"])
    return "\n".join([
        "## Evaluating a model too big to hold: one block in memory at a time",
        "",
        f"Reproduce: `{STREAM_COMMAND}`",
        "",
        f"Machine: {machine_description()}; load average at the end: {load_average()}.",
        "",
        f"A synthetic Llama (TinyLlama widths, {STREAM_LAYERS} blocks, SmolLM2's 49,152-token vocabulary, random "
        f"bf16 weights: memory only, never quality): {result['parameters'] / 1e9:.2f} B parameters, "
        f"{result['bf16_bytes'] / gib:.2f} GiB in bf16, {result['fp32_bytes'] / gib:.2f} GiB in float32 (every "
        "metric computes in float32). Its rtn int8 artifact came from a layer-by-layer job "
        f"({result['artifact_bytes'] / gib:.2f} GiB). `evaluate_standalone` (what `POST /v1/evaluations` runs) "
        "measured both with perplexity and generation agreement (one news document) and accuracy (4 review rows), "
        "each engine in its own process, peak RSS of the process sampled every 50 ms:",
        "",
        markdown_table(["run", "engine", "peak RSS GiB", "RSS after imports GiB", "peak / fp32 weights",
                        "ΔPPL", "Δ accuracy", "generation agreement"], rows),
        "",
        f"- Streamed and loaded give the same deltas: {'yes' if same else 'NO'}. The streamed peak is the "
        "imports, one float32 block or the embeddings or the head, and the activations and logits of a pass; "
        "loaded holds the original and the artifact in float32.",
    ])


def close(first: float | None, second: float | None) -> bool:
    """Equal up to float noise (a streamed pass computes each block in float32, as the loaded model does)."""
    if first is None or second is None:
        return first is second
    return abs(first - second) <= 1e-4 * max(1.0, abs(first))


def command(args: argparse.Namespace) -> str:
    """COMMAND with the sample counts this run used where they differ from the defaults."""
    used = {"--news-docs": (args.news_docs, NEWS_DOCS), "--gptq-samples": (args.gptq_samples, GPTQ_SAMPLES),
            "--reviews": (args.reviews, 200)}
    return " ".join([COMMAND, *(f"{flag} {value}" for flag, (value, default) in used.items() if value != default)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--news-docs", type=int, default=NEWS_DOCS)
    parser.add_argument("--gptq-samples", type=int, default=GPTQ_SAMPLES)
    parser.add_argument("--reviews", type=int, default=200, help="sentiment rows (balanced)")
    parser.add_argument("--screenshot", type=Path, default=SCREENSHOT)
    parser.add_argument("--out", type=Path, default=None, help="write the section here, not docs/benchmarks.md")
    parser.add_argument("--json", type=Path, default=None, help="also save the raw results here")
    parser.add_argument("--from-json", type=Path, default=None, help="write the section from saved raw results")
    parser.add_argument("--streamed", action="store_true", help="the streamed evaluation's memory (own section)")
    parser.add_argument("--child", nargs=4, metavar=("ENGINE", "SOURCE", "ARTIFACT", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        streamed_child(args.child[0], *map(Path, args.child[1:]))
        return 0
    if args.streamed:
        with tempfile.TemporaryDirectory(prefix="mcs-bench-evaluation-streamed-") as tmp:
            streamed = streamed_check(Path(tmp))
        if args.json:
            args.json.write_text(json.dumps(streamed, indent=1))
        body = streamed_section(streamed)
        update_section(f"{NAME}_streamed", body, *([args.out] if args.out else []))
        print(body)
        return 0
    result = json.loads(args.from_json.read_text()) if args.from_json else measured(args)
    body = section(result, args)
    update_section(NAME, body, *([args.out] if args.out else []))
    print(body)
    return 0 if all(checks(result).values()) else 1


def measured(args: argparse.Namespace) -> dict[str, Any]:
    """Start the stack, run everything, save the raw results where `--json` says."""
    database, broker = os.environ.get("MCS_DATABASE_URL", ""), os.environ.get("MCS_BROKER_URL", "")
    if not database.startswith("postgresql") or not broker:
        raise SystemExit("set MCS_DATABASE_URL (PostgreSQL) and MCS_BROKER_URL (Redis); see the docstring")
    ensure_database(database)
    with tempfile.TemporaryDirectory(prefix="mcs-bench-evaluation-") as tmp:
        root = Path(tmp)
        env = {**stack_env(root), "OMP_NUM_THREADS": "1"}  # two jobs at a time, one thread each
        key = create_key(env)
        worker = [sys.executable, "-m", "cli.main", "worker", "--queues", "cpu", "--concurrency", "2"]
        with running({"api": uvicorn_command("api.main:app", free_port(), 1), "worker": worker}, env,
                     root / "logs") as stack, \
                httpx.Client(base_url=stack["url"], headers={"Authorization": f"Bearer {key}"}, timeout=600) as api:
            result = run(api, args, root)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation on the user's own held-out data: each metric is measured per sample on the original and on the artifact
loaded back from disk, and every delta (artifact minus original) comes with a paired bootstrap 95% CI.

Pure (torch, transformers, numpy). The caller opens each model in turn (a loaded one, or `streamed_model` for one too
big to hold): the original is measured first and only what the artifact's metrics need of it is kept (embeddings,
greedy continuations as token ids), never a second copy of the model.

Example: `evaluate_models(request, lambda: nullcontext(original), lambda: nullcontext(artifact), tokenizer)`.
"""

import hashlib
import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from core.compression import metrics as base_metrics
from core.compression.spec import evaluation_refusal
from core.compression.state import model_device
from core.errors import InvalidSpec

BOOTSTRAP_RESAMPLES = 1000  # percentile CI from 1,000 paired resamples: the 2.5% and 97.5% points
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
PPL_WINDOW = 512  # tokens per perplexity window (or the model's max positions when fewer), as in metrics.perplexity
PROMPT_TOKENS = 64  # generation agreement: the first 64 tokens of a row are the prompt,
NEW_TOKENS = 16  # and the original's greedy continuation is 16 tokens long
SPAN_TOKENS = 13  # perplexity windows overlap calibration text when they share a run of 13 tokens
BATCH = 16  # rows per forward pass of a loaded model; a streamed one (each pass reads every block) takes more
STREAMED_BATCH = 64
# The fields each metric reads from a dataset row (core.service.datasets stores them).
ROW_FIELDS: dict[str, tuple[str, ...]] = {
    "perplexity": ("text",), "accuracy": ("question", "choices", "answer"), "generation_agreement": ("text",),
    "embedding_cosine": ("text",), "sts_spearman": ("text", "text_pair", "score"),
    "classification_accuracy": ("text", "label"), "macro_f1": ("text", "label"),
}
NOTES = {
    "perplexity": "token-weighted perplexity over fixed non-overlapping windows of the rows' text (joined by blank "
                  "lines); lower is better; the CI resamples windows; ratio = artifact / original",
    "accuracy": "multiple choice: the choice with the highest summed log-likelihood of its tokens after the question "
                "(lm-evaluation-harness's `acc`); the CI resamples rows",
    "generation_agreement": f"share of the original's {NEW_TOKENS} greedy tokens after each row's first "
                            f"{PROMPT_TOKENS} tokens that the model also predicts (teacher-forced on the original's "
                            "continuation); the original scores itself, so it is 1 up to float ties",
    "embedding_cosine": "cosine of each row's mean-pooled embedding with the original's; the CI resamples rows",
    "sts_spearman": "Spearman correlation of cos(text, text_pair) with the rows' scores; the CI resamples rows",
    "classification_accuracy": "share of rows whose arg-max class is the row's label",
    "macro_f1": "F1 per class, averaged over the classes present (labels or predictions) in the sample",
}

Statistic = Callable[[np.ndarray], float]
ModelOpener = Callable[[], AbstractContextManager[nn.Module]]


@dataclass(frozen=True)
class EvaluationRequest:
    """What to measure: the metrics, the held-out rows (already cut to max_samples), and the texts the steps
    calibrate or train on, by dataset id ("default corpus" for the built-in one), to check for overlap."""

    dataset_id: str
    metrics: tuple[str, ...]
    rows: list[dict[str, Any]]
    reference_texts: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Setup:
    tokenizer: PreTrainedTokenizerBase
    batch: int  # rows per forward pass; perplexity windows go batch // 16 at a time (their logits are large)


@dataclass
class _Measured:
    values: np.ndarray  # one row per sample (window, row); the metric's statistic reduces them
    kept: Any = None  # what the artifact's measurement needs from the original's


def evaluate_models(request: EvaluationRequest, open_original: ModelOpener, open_artifact: ModelOpener,
                    tokenizer: PreTrainedTokenizerBase | None, batch: int = BATCH) -> dict[str, Any]:
    """Measure the original, then the artifact, and compare: the job's `evaluation` metrics. InvalidSpec when the
    model, its tokenizer or the rows do not fit a metric. `batch`: rows per forward pass (STREAMED_BATCH for
    `streamed_model`s, whose every pass reads all blocks)."""
    if tokenizer is None:
        raise InvalidSpec("evaluation needs the model's tokenizer files; the uploaded model has none")
    for metric in request.metrics:
        check_rows(metric, request.rows)
    setup = _Setup(tokenizer, batch)
    with open_original() as model, torch.no_grad():
        _check_fits(model, request.metrics)
        original = {m: MEASURES[m](model, setup, request.rows, None) for m in request.metrics}
    with open_artifact() as model, torch.no_grad():
        artifact = {m: MEASURES[m](model, setup, request.rows, original[m].kept) for m in request.metrics}
    return {
        "dataset_id": request.dataset_id,
        "samples": len(request.rows),
        "metrics": {m: compare(m, original[m].values, artifact[m].values) for m in request.metrics},
        "overlap": _overlaps(request, setup, original),
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "confidence": CONFIDENCE,
                      "method": "paired percentile bootstrap: the same resampled indices for both models"},
    }


def _check_fits(model: nn.Module, metrics: Sequence[str]) -> None:
    if reason := evaluation_refusal(list(metrics), type(model).__name__):
        raise InvalidSpec(reason, [{"field": "evaluate.metrics", "message": reason}])


def check_rows(metric: str, rows: Sequence[dict[str, Any]]) -> None:
    """InvalidSpec naming the first row that lacks a field `metric` reads."""
    if not rows:
        raise InvalidSpec("the evaluation dataset has no rows")
    for number, row in enumerate(rows, start=1):
        missing = [name for name in ROW_FIELDS[metric] if name not in row]
        if missing:
            message = (f"evaluation metric {metric} needs rows with {', '.join(ROW_FIELDS[metric])}; "
                       f"row {number} of the dataset has no {', '.join(missing)}")
            raise InvalidSpec(message, [{"field": "evaluate.metrics", "message": message}])


# ---- the comparison ------------------------------------------------------------------------------------------


def compare(metric: str, original: np.ndarray, artifact: np.ndarray) -> dict[str, Any]:
    """Both models' values, the delta (artifact minus original) and its paired bootstrap 95% CI; perplexity adds
    the ratio and its CI from the same resamples."""
    statistic = STATISTICS[metric]
    before, after = statistic(original), statistic(artifact)
    resampled_before, resampled_after = paired_bootstrap(original, artifact, statistic)
    result: dict[str, Any] = {
        "original": _number(before), "artifact": _number(after), "delta": _number(after - before),
        "ci95": _interval(resampled_after - resampled_before), "n": len(original), "note": NOTES[metric],
    }
    if len(original) < 2:
        result["note"] += "; ONE sample only: the CI says nothing about the uncertainty (use more data)"
    if metric == "perplexity":
        result["ratio"] = _number(after / before)
        result["ratio_ci95"] = _interval(resampled_after / resampled_before)
        result["n_tokens"] = int(original[:, 1].sum())
    return result


def paired_bootstrap(original: np.ndarray, artifact: np.ndarray, statistic: Statistic,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[np.ndarray, np.ndarray]:
    """The statistic of each model on the same `resamples` resamples (with replacement) of the sample indices:
    pairing keeps the per-sample correlation of the two models out of the delta's spread."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(original), size=(resamples, len(original)))
    return (np.array([statistic(original[index]) for index in indices]),
            np.array([statistic(artifact[index]) for index in indices]))


def _interval(values: np.ndarray) -> list[float | None]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return [None, None]
    low, high = np.percentile(finite, [50 * (1 - CONFIDENCE), 100 - 50 * (1 - CONFIDENCE)])
    return [float(low), float(high)]


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None  # JSON has no NaN: a constant sample has no correlation


def mean(values: np.ndarray) -> float:
    return float(values.mean())


def token_weighted_perplexity(values: np.ndarray) -> float:
    """exp(sum of window NLLs / sum of window tokens): rows are (nll_sum, tokens) per window."""
    return float(math.exp(values[:, 0].sum() / values[:, 1].sum()))


def spearman(values: np.ndarray) -> float:
    """Spearman's rho of columns 0 and 1 (average ranks for ties); NaN when either is constant."""
    first, second = _ranks(values[:, 0]), _ranks(values[:, 1])
    if first.std() == 0 or second.std() == 0:
        return float("nan")
    return float(np.corrcoef(first, second)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def macro_f1(values: np.ndarray) -> float:
    """Macro-averaged F1 of (prediction, label) rows over the classes that occur in either column."""
    predictions, labels = values[:, 0], values[:, 1]
    scores = []
    for cls in np.union1d(predictions, labels):
        true_pos = np.sum((predictions == cls) & (labels == cls))
        wrong = np.sum((predictions == cls) != (labels == cls))  # false positives and false negatives of cls
        scores.append(2 * true_pos / (2 * true_pos + wrong))
    return float(np.mean(scores))


# ---- overlap -------------------------------------------------------------------------------------------------


def normalised_hash(text: str) -> str:
    """sha256 of the text lowercased with its whitespace collapsed: how samples are compared for overlap."""
    return hashlib.sha256(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def _overlaps(request: EvaluationRequest, setup: _Setup, original: dict[str, _Measured]) -> dict[str, Any]:
    """Overlap of rows by normalised text; with perplexity, also of its windows by shared token spans."""
    found = overlap(request.rows, request.reference_texts)
    if "perplexity" in original and request.reference_texts:
        token_ids, window = original["perplexity"].kept
        references = [_encode(setup.tokenizer, text) for texts in request.reference_texts.values() for text in texts]
        found["token_spans"] = span_overlap(token_ids, window, references)
        if found["token_spans"]["windows"]:
            spans = found["token_spans"]
            warning = (f"OVERLAP: {spans['windows']} of {spans['of']} perplexity windows share a {SPAN_TOKENS}-token "
                       "span with the calibration/training data")
            found["warning"] = f"{found['warning']}; {warning}" if found["warning"] else warning
    return found


def span_overlap(token_ids: torch.Tensor, window: int, references: Sequence[Sequence[int]],
                 span: int = SPAN_TOKENS) -> dict[str, Any]:
    """How many perplexity windows of `token_ids` share a run of `span` tokens with any reference token list
    (13, as GPT-3's contamination check uses): exact text matches miss a calibration article that contains the
    evaluation text, or the reverse."""
    known = np.concatenate([_span_hashes(np.asarray(ids), span) for ids in references] or [np.empty(0, np.uint64)])
    windows = [chunk for chunk in token_ids.split(window) if chunk.numel() >= 2]
    hits = sum(bool(np.isin(_span_hashes(chunk.numpy(), span), known).any()) for chunk in windows)
    return {"span_tokens": span, "windows": hits, "of": len(windows),
            "fraction": hits / len(windows) if windows else 0.0}


def _span_hashes(ids: np.ndarray, span: int) -> np.ndarray:
    """A 64-bit polynomial hash of every run of `span` consecutive tokens (wrapping arithmetic, no collisions to
    speak of at these sizes)."""
    if len(ids) < span:
        return np.empty(0, np.uint64)
    runs = np.lib.stride_tricks.sliding_window_view(ids.astype(np.uint64), span)
    powers = np.uint64(1_000_003) ** np.arange(span, dtype=np.uint64)
    return (runs * powers).sum(axis=1, dtype=np.uint64)


def overlap(rows: Sequence[dict[str, Any]], reference_texts: dict[str, list[str]]) -> dict[str, Any]:
    """How many evaluation rows (their `text` or `text_pair`) equal, once normalised, a text the steps calibrate or
    train on; `warning` says so loudly when any do."""
    seen: dict[str, set[str]] = {}
    for name, texts in reference_texts.items():
        for text in texts:
            seen.setdefault(normalised_hash(text), set()).add(name)
    hit_sets = [set().union(*(seen.get(normalised_hash(row[key]), set()) for key in ("text", "text_pair")
                              if isinstance(row.get(key), str))) for row in rows]
    count = sum(1 for hits in hit_sets if hits)
    datasets = sorted(set().union(*hit_sets)) if hit_sets else []
    result: dict[str, Any] = {
        "count": count, "fraction": count / len(rows) if rows else 0.0, "datasets": datasets,
        "compared_with": sorted(reference_texts),
        "method": "sha256 of each text lowercased and whitespace-collapsed, evaluation rows vs calibration/training "
                  "samples",
        "warning": None,
    }
    if count:
        result["warning"] = (f"OVERLAP: {count} of {len(rows)} evaluation rows also occur in the calibration/training "
                             f"data ({', '.join(datasets)}); the evaluation may flatter the artifact")
    return result


# ---- causal LMs ----------------------------------------------------------------------------------------------


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _max_positions(model: nn.Module, default: int) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or default)


def window_nlls(model: nn.Module, token_ids: torch.Tensor, window: int, batch: int = 1) -> np.ndarray:
    """(summed NLL, predicted tokens) of each non-overlapping `window` of `token_ids`, scored on its own: the
    windows metrics.perplexity sums (with batch=1, the same arithmetic), `batch` windows per forward pass."""
    device, rows = model_device(model), []
    chunks = [chunk for chunk in token_ids.split(window) if chunk.numel() >= 2]
    for start in range(0, len(chunks), batch):
        for _, same in itertools.groupby(chunks[start: start + batch], key=len):  # only the last is shorter
            stacked = torch.stack(list(same)).to(device)
            logits = model(input_ids=stacked).logits.float()
            for row, chunk in zip(logits, stacked, strict=True):
                nll = F.cross_entropy(row[:-1], chunk[1:], reduction="sum")
                rows.append((nll.item(), chunk.numel() - 1))
    return np.array(rows, dtype=np.float64)


def _perplexity(model: nn.Module, setup: _Setup, rows: list[dict[str, Any]], kept: Any) -> _Measured:
    token_ids = torch.tensor(setup.tokenizer("\n\n".join(row["text"] for row in rows))["input_ids"])
    if token_ids.numel() < 2:
        raise InvalidSpec("perplexity needs at least 2 tokens of evaluation text")
    window = min(PPL_WINDOW, _max_positions(model, PPL_WINDOW))
    return _Measured(window_nlls(model, token_ids, window, max(1, setup.batch // 16)), (token_ids, window))


def _choice_requests(tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]],
                     limit: int) -> list[tuple[list[int], int]]:
    """(token ids, continuation length) per row and choice: the context is the question, the continuation " " +
    the choice, split where the question's own tokens end (lm-evaluation-harness's `_encode_pair`)."""
    requests = []
    for row in rows:
        context = _encode(tokenizer, row["question"])
        for choice in row["choices"]:
            whole = _encode(tokenizer, f"{row['question']} {choice}")
            continuation = whole[len(context):] or _encode(tokenizer, " " + choice)
            ids = (_prefix(tokenizer) + context + continuation)[-limit:]
            requests.append((ids, min(len(continuation), len(ids) - 1)))
    return requests


def _sequence_logprobs(model: nn.Module, requests: list[tuple[list[int], int]], batch: int) -> list[float]:
    """Summed log-probability of each request's last `n` tokens given the tokens before them (left-padded, so
    the continuations end together and only their logits are computed)."""
    device, scores = model_device(model), []
    for start in range(0, len(requests), batch):
        group = requests[start: start + batch]
        inputs = {k: v.to(device) for k, v in _left_padded([ids for ids, _ in group], 0).items()}
        longest = max(n for _, n in group)
        logprobs = _logits(model, **inputs, keep=longest + 1)[:, :-1].log_softmax(-1)
        for row, (_, n) in enumerate(group):
            targets = inputs["input_ids"][row, -n:]
            scores.append(logprobs[row, -n:].gather(-1, targets[:, None]).sum().item())
    return scores


def _accuracy(model: nn.Module, setup: _Setup, rows: list[dict[str, Any]], kept: Any) -> _Measured:
    requests = _choice_requests(setup.tokenizer, rows, _max_positions(model, 2048))
    scores = iter(_sequence_logprobs(model, requests, setup.batch))
    correct = []
    for row in rows:
        choice_scores = [next(scores) for _ in row["choices"]]
        correct.append(float(int(np.argmax(choice_scores)) == row["answer"]))
    return _Measured(np.array(correct))


def _left_padded(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(prompt) for prompt in prompts)
    return {"input_ids": torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts]),
            "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])}


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """The last `keep` positions' logits of a left-padded batch, with positions counted from each row's first real
    token where the model takes `position_ids` (Llama, GPT-2, ...); only those logits are computed where the model
    takes `logits_to_keep` (a 64 x 80 batch's full logits over a 49k vocabulary would be 1 GB)."""
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    parameters = inspect.signature(model.forward).parameters
    if "position_ids" in parameters:
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = keep
    return model(**kwargs).logits[:, -keep:].float()


def _greedy(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with NEW_TOKENS greedy tokens appended (no cache: a streamed model reads each block per pass)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for _ in range(NEW_TOKENS):
        following = _logits(model, ids, mask, keep=1)[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, following], 1), torch.cat([mask, torch.ones_like(following)], 1)
    return {"input_ids": ids, "attention_mask": mask}


def _generation_agreement(model: nn.Module, setup: _Setup, rows: list[dict[str, Any]], kept: Any) -> _Measured:
    """The original (kept None) writes the continuations; both models are then scored on them, teacher-forced."""
    device, tokenizer = model_device(model), setup.tokenizer
    if kept is None:
        limit = max(1, min(PROMPT_TOKENS, _max_positions(model, 2048) - NEW_TOKENS))
        prompts = [(_prefix(tokenizer) + _encode(tokenizer, row["text"]))[:limit] for row in rows]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        batches = [_left_padded(prompts[i: i + setup.batch], pad_id) for i in range(0, len(prompts), setup.batch)]
        kept = [_greedy(model, {k: v.to(device) for k, v in batch.items()}) for batch in batches]
    agreement = []
    for batch in kept:
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        predicted = _logits(model, ids, mask, keep=NEW_TOKENS + 1)[:, :-1].argmax(-1)
        agreement.extend((predicted == ids[:, -NEW_TOKENS:]).float().mean(-1).tolist())
    return _Measured(np.array(agreement), kept)


# ---- encoders ------------------------------------------------------------------------------------------------


def _embeddings(model: nn.Module, setup: _Setup, texts: list[str]) -> torch.Tensor:
    """One embedding per text, each distinct text embedded once: STS datasets pair the same texts many times
    (gensim's lee.cor gives 1,225 pairs of 50 documents, 49x fewer forward passes)."""
    distinct = list(dict.fromkeys(texts))
    embedded = base_metrics.sentence_embeddings(model, setup.tokenizer, distinct, batch_size=setup.batch).cpu()
    position = {text: index for index, text in enumerate(distinct)}
    return embedded[[position[text] for text in texts]]


def _embedding_cosine(model: nn.Module, setup: _Setup, rows: list[dict[str, Any]], kept: Any) -> _Measured:
    """Each row's embedding vs the original's (the original vs itself: 1 up to rounding)."""
    embeddings = _embeddings(model, setup, [row["text"] for row in rows])
    reference = embeddings if kept is None else kept
    return _Measured(base_metrics.row_cosines(reference, embeddings).double().numpy(), reference)


def _sts_spearman(model: nn.Module, setup: _Setup, rows: list[dict[str, Any]], kept: Any) -> _Measured:
    embedded = _embeddings(model, setup, [row["text"] for row in rows] + [row["text_pair"] for row in rows])
    first, second = embedded[: len(rows)], embedded[len(rows):]
    similarity = base_metrics.row_cosines(first, second).double().numpy()
    return _Measured(np.stack([similarity, np.array([float(row["score"]) for row in rows])], axis=1))


def _label_index(model: nn.Module, label: str | int) -> int:
    """A row's label as the model's class index: an integer as is, a string through config.label2id."""
    config: Any = model.config
    label2id = getattr(config, "label2id", None) or {}
    index = label if isinstance(label, int) else label2id.get(label)
    if index is None or not 0 <= index < config.num_labels:
        message = (f"label {label!r} is not a class of the model (num_labels={config.num_labels}, "
                   f"label2id={label2id})")
        raise InvalidSpec(message, [{"field": "evaluate.dataset_id", "message": message}])
    return int(index)


def _predictions(model: nn.Module, setup: _Setup, rows: list[dict[str, Any]], kept: Any) -> _Measured:
    """(predicted class, label) per row."""
    labels = [_label_index(model, row["label"]) for row in rows]
    device, predicted = model_device(model), []
    for start in range(0, len(rows), setup.batch):
        texts = [row["text"] for row in rows[start: start + setup.batch]]
        encoded = setup.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        predicted.extend(model(**{k: v.to(device) for k, v in encoded.items()}).logits.argmax(-1).tolist())
    return _Measured(np.array([predicted, labels], dtype=np.float64).T)


def _classification_accuracy(model: nn.Module, setup: _Setup, rows: list[dict[str, Any]], kept: Any) -> _Measured:
    pairs = _predictions(model, setup, rows, kept).values
    return _Measured((pairs[:, 0] == pairs[:, 1]).astype(np.float64))


Measure = Callable[[nn.Module, _Setup, list[dict[str, Any]], Any], _Measured]
MEASURES: dict[str, Measure] = {
    "perplexity": _perplexity, "accuracy": _accuracy, "generation_agreement": _generation_agreement,
    "embedding_cosine": _embedding_cosine, "sts_spearman": _sts_spearman,
    "classification_accuracy": _classification_accuracy, "macro_f1": _predictions,
}
STATISTICS: dict[str, Statistic] = {
    "perplexity": token_weighted_perplexity, "accuracy": mean, "generation_agreement": mean,
    "embedding_cosine": mean, "sts_spearman": spearman, "classification_accuracy": mean, "macro_f1": macro_f1,
}


# ---- one model alone, and the per-step waterfall's subset ----------------------------------------------------

# These compare a model with an original by definition: a model evaluated alone has none.
COMPARATIVE = ("embedding_cosine", "generation_agreement")
WATERFALL_SAMPLES = 32  # rows the per-step waterfall measures after every step (the final evaluation uses them all)


def evaluate_model(request: EvaluationRequest, open_model: ModelOpener, tokenizer: PreTrainedTokenizerBase | None,
                   batch: int = BATCH) -> dict[str, Any]:
    """Measure one model alone (a standalone evaluation of an uploaded model): each metric's value with the
    bootstrap 95% CI of that value. InvalidSpec for a metric that needs an original to compare with."""
    if unfit := [metric for metric in request.metrics if metric in COMPARATIVE]:
        message = (f"evaluation metric(s) {', '.join(unfit)} compare a model with its original; evaluate a job's "
                   "artifact (artifact_id or job_id) to measure them")
        raise InvalidSpec(message, [{"field": "evaluate.metrics", "message": message}])
    if tokenizer is None:
        raise InvalidSpec("evaluation needs the model's tokenizer files; the uploaded model has none")
    for metric in request.metrics:
        check_rows(metric, request.rows)
    setup = _Setup(tokenizer, batch)
    with open_model() as model, torch.no_grad():
        _check_fits(model, request.metrics)
        measured = {m: MEASURES[m](model, setup, request.rows, None) for m in request.metrics}
    return {
        "dataset_id": request.dataset_id,
        "samples": len(request.rows),
        "metrics": {m: describe(m, measured[m].values) for m in request.metrics},
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "confidence": CONFIDENCE,
                      "method": "percentile bootstrap of the statistic over resampled samples"},
    }


def describe(metric: str, values: np.ndarray) -> dict[str, Any]:
    """One model's statistic and its bootstrap 95% CI (the same resamples as `paired_bootstrap`)."""
    statistic = STATISTICS[metric]
    resampled, _ = paired_bootstrap(values, values, statistic)
    result: dict[str, Any] = {"value": _number(statistic(values)), "ci95": _interval(resampled), "n": len(values),
                              "note": NOTES[metric]}
    if metric == "perplexity":
        result["n_tokens"] = int(values[:, 1].sum())
    return result


class StepQuality:
    """The per-step waterfall's quality numbers: the original measured once on the first `samples` rows (before any
    step changes it), then each later state of the model on the same rows, compared with it. No CI: a cheap subset
    says which step cost what; the job's final evaluation on every row carries the CIs. Nothing of the original is
    kept but what its metrics need (token ids, embeddings, continuations), never a copy of the model.

    Example: `quality = StepQuality(request, model, tokenizer)`, then `quality.measure(model)` after each step."""

    def __init__(self, request: EvaluationRequest, original: nn.Module, tokenizer: PreTrainedTokenizerBase | None,
                 samples: int = WATERFALL_SAMPLES, batch: int = BATCH) -> None:
        if tokenizer is None:
            raise InvalidSpec("evaluation needs the model's tokenizer files; the uploaded model has none")
        self.rows = request.rows[:samples]
        for metric in request.metrics:
            check_rows(metric, self.rows)
        self.subset = (f"the first {len(self.rows)} of the {len(request.rows)} evaluation rows of dataset "
                       f"{request.dataset_id} (the final evaluation uses all of them, with CIs)")
        self._setup = _Setup(tokenizer, batch)
        _check_fits(original, request.metrics)
        with torch.no_grad():
            self._original = {m: MEASURES[m](original, self._setup, self.rows, None) for m in request.metrics}

    def measure(self, model: nn.Module) -> dict[str, dict[str, float | None]]:
        """{metric: {"original", "value", "delta"}} of `model` on the subset."""
        found = {}
        with torch.no_grad():
            for metric, original in self._original.items():
                statistic = STATISTICS[metric]
                values = MEASURES[metric](model, self._setup, self.rows, original.kept).values
                before, after = statistic(original.values), statistic(values)
                found[metric] = {"original": _number(before), "value": _number(after), "delta": _number(after - before)}
        return found

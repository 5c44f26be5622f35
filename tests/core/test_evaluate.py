"""Evaluation on the user's data: the paired bootstrap covers the truth, identical models differ by exactly 0, the
perplexity is metrics.perplexity's, the hand-written statistics match scipy/scikit-learn, and overlap is found."""

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import f1_score
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from core.compression import metrics
from core.compression.evaluate import (
    EvaluationRequest,
    evaluate_models,
    macro_f1,
    mean,
    overlap,
    paired_bootstrap,
    span_overlap,
    spearman,
    token_weighted_perplexity,
    window_nlls,
)
from core.compression.spec import JobSpec, evaluation_refusal
from core.compression.streamed import streamed_model
from core.errors import InvalidSpec
from tests.models import save_model_folder, tiny_bert, tiny_llama, tiny_tokenizer

CHOICE_ROWS = [
    {"text": q, "question": q, "choices": choices, "answer": answer}
    for q, choices, answer in [
        ("The quick brown fox jumps over the", ["lazy dog", "coffee", "harbour"], 0),
        ("Please send the quarterly report to the", ["finance team", "puppy"], 0),
        ("The museum opens at nine and closes at", ["five", "the piano", "storm"], 0),
        ("Children laughed as the puppy chased its", ["tail", "report"], 0),
        ("It rained all afternoon, so the match was moved", ["indoors", "coffee"], 1),
        ("She found an old map of the city in her", ["attic", "grandfather's attic"], 1),
    ]
]
PAIR_ROWS = [
    {"text": a, "text_pair": b, "score": s}
    for a, b, s in [
        ("The quick brown fox", "the lazy dog", 2.0), ("A good cup of coffee", "coffee in the morning", 4.0),
        ("Prices rose sharply", "the storm damaged the harbour", 1.5), ("Short sentence.", "Short sentence.", 5.0),
        ("The museum opens at nine", "closes at five on weekdays", 3.0), ("He practised the piano", "the sonata", 2.5),
    ]
]
LABEL_ROWS = [{"text": row["text"], "label": index % 3} for index, row in enumerate(PAIR_ROWS)]


def tiny_classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128, num_labels=3)
    return BertForSequenceClassification(config).eval()


def untied_llama() -> LlamaForCausalLM:
    """tiny_llama's shape with its own head: a random tied model only repeats its input's last token."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def perturbed(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * parameter.std())
    return model


def evaluate(original: Any, artifact: Any, rows: list[dict[str, Any]], names: tuple[str, ...],
             references: dict[str, list[str]] | None = None) -> dict[str, Any]:
    request = EvaluationRequest("dst_test", names, rows, references or {})
    return evaluate_models(request, lambda: nullcontext(original), lambda: nullcontext(artifact), tiny_tokenizer())


def test_the_paired_bootstrap_ci_covers_the_true_mean_delta() -> None:
    # 60 synthetic paired samples of size 80, true delta 0.3: a 95% CI should miss about 3 times in 60.
    rng, covered = np.random.default_rng(42), 0
    for seed in range(60):
        original = rng.normal(0.0, 1.0, 80)
        artifact = original + 0.3 + rng.normal(0.0, 0.5, 80)
        before, after = paired_bootstrap(original, artifact, mean, seed=seed)
        low, high = np.percentile(after - before, [2.5, 97.5])
        covered += low <= 0.3 <= high
    assert covered >= 52, covered
    # pairing: the per-sample noise shared by both models (sd 1) does not widen the CI, only the difference's (0.5)
    assert high - low < 4 * 0.5 / np.sqrt(80) * 1.5


@pytest.mark.parametrize(("make", "rows", "names"), [
    (tiny_llama, CHOICE_ROWS, ("perplexity", "accuracy", "generation_agreement")),
    (tiny_bert, PAIR_ROWS, ("embedding_cosine", "sts_spearman")),
    (tiny_classifier, LABEL_ROWS, ("classification_accuracy", "macro_f1")),
], ids=["causal lm", "encoder", "classifier"])
def test_identical_models_give_delta_zero_with_ci_zero(make: Any, rows: list[dict[str, Any]],
                                                       names: tuple[str, ...]) -> None:
    model = make()
    result = evaluate(model, model, rows, names)
    assert set(result["metrics"]) == set(names) and result["bootstrap"]["resamples"] == 1000
    for name, measured in result["metrics"].items():
        assert measured["delta"] == 0.0 and measured["ci95"] == [0.0, 0.0], name
        assert measured["original"] == measured["artifact"] and measured["n"] > 0 and measured["note"], name


def test_a_changed_model_gets_a_nonzero_delta_inside_its_ci() -> None:
    result = evaluate(untied_llama(), perturbed(untied_llama(), 0.1), CHOICE_ROWS,
                      ("perplexity", "generation_agreement"))
    ppl, agreement = result["metrics"]["perplexity"], result["metrics"]["generation_agreement"]
    assert ppl["delta"] != 0 and ppl["ci95"][0] <= ppl["delta"] <= ppl["ci95"][1]
    assert ppl["ratio"] == pytest.approx(ppl["artifact"] / ppl["original"])
    assert ppl["ratio_ci95"][0] <= ppl["ratio"] <= ppl["ratio_ci95"][1]
    assert agreement["original"] == 1.0 and 0 <= agreement["artifact"] < 1.0
    assert agreement["ci95"][0] <= agreement["delta"] <= agreement["ci95"][1] <= 0


def test_perplexity_is_metrics_perplexity() -> None:
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    ids = torch.tensor(tokenizer(" ".join(metrics.PROBE_SENTENCES * 3))["input_ids"])
    expected = metrics.perplexity(model, ids, window=32)
    assert token_weighted_perplexity(window_nlls(model, ids, 32)) == pytest.approx(expected, rel=1e-9)
    assert token_weighted_perplexity(window_nlls(model, ids, 32, batch=3)) == pytest.approx(expected, rel=1e-5)
    result = evaluate(model, model, CHOICE_ROWS, ("perplexity",))["metrics"]["perplexity"]
    joined = torch.tensor(tokenizer("\n\n".join(row["text"] for row in CHOICE_ROWS))["input_ids"])
    assert result["original"] == pytest.approx(metrics.perplexity(model, joined, window=128), rel=1e-9)
    assert result["n_tokens"] == joined.numel() - 1


def test_a_streamed_model_measures_what_the_loaded_one_does(tmp_path: Path) -> None:
    folder = save_model_folder(tiny_llama(), tmp_path / "llama")
    names = ("perplexity", "accuracy", "generation_agreement")
    request = EvaluationRequest("dst_test", names, CHOICE_ROWS * 2, {})
    streamed = evaluate_models(request, lambda: streamed_model(folder), lambda: streamed_model(folder),
                               tiny_tokenizer(), batch=64)  # as execute runs streamed models: every row at once
    loaded = evaluate(tiny_llama(), tiny_llama(), CHOICE_ROWS * 2, names)
    for name in names:
        assert streamed["metrics"][name]["original"] == pytest.approx(loaded["metrics"][name]["original"], rel=1e-5)


def test_spearman_and_macro_f1_match_scipy_and_sklearn() -> None:
    rng = np.random.default_rng(0)
    pairs = np.stack([rng.normal(size=50), rng.integers(0, 5, 50)], axis=1)  # ties in the second column
    assert spearman(pairs) == pytest.approx(spearmanr(pairs[:, 0], pairs[:, 1]).statistic, abs=1e-12)
    labels = np.stack([rng.integers(0, 4, 60), rng.integers(0, 3, 60)], axis=1).astype(float)
    assert macro_f1(labels) == pytest.approx(f1_score(labels[:, 1], labels[:, 0], average="macro"), abs=1e-12)


def test_sts_embeds_each_distinct_text_once_and_scores_as_every_row_embedded() -> None:
    # 12 pairs of 4 texts (an STS dataset pairs the same documents many times): 4 texts embedded, not 24
    texts = [row["text"] for row in PAIR_ROWS[:4]]
    rows = [{"text": a, "text_pair": b, "score": float(i)} for i, (a, b) in enumerate(
        (a, b) for a in texts for b in texts if a != b)]
    model, embedded = tiny_bert(), []
    model.register_forward_hook(lambda module, args, output: embedded.append(output.last_hidden_state.shape[0]))
    result = evaluate(model, model, rows, ("sts_spearman",))["metrics"]["sts_spearman"]
    assert embedded == [4, 4]  # the original, then the artifact: one batch of the 4 distinct texts each
    first = metrics.sentence_embeddings(model, tiny_tokenizer(), [row["text"] for row in rows])
    second = metrics.sentence_embeddings(model, tiny_tokenizer(), [row["text_pair"] for row in rows])
    pairs = np.stack([metrics.row_cosines(first, second).detach().double().numpy(),
                      [row["score"] for row in rows]], axis=1)
    assert result["original"] == pytest.approx(spearman(pairs), abs=1e-9) and result["n"] == 12


def test_overlap_compares_normalised_texts() -> None:
    rows = [{"text": "Hello   World"}, {"text": "something else", "text_pair": "THE pair\ttext"}, {"text": "new"}]
    found = overlap(rows, {"dst_cal": ["hello world", "the pair text"], "default corpus": ["unrelated"]})
    assert (found["count"], found["fraction"], found["datasets"]) == (2, 2 / 3, ["dst_cal"])
    assert "OVERLAP: 2 of 3" in found["warning"]
    assert overlap(rows, {"dst_cal": ["other"]})["warning"] is None


def test_perplexity_windows_sharing_a_13_token_span_with_calibration_text_are_flagged() -> None:
    ids = torch.arange(100)  # windows of 20: [0, 20), [20, 40), ...
    assert span_overlap(ids, 20, [list(range(45, 58)), [1, 2, 3]])["windows"] == 1  # 13 tokens inside [40, 60)
    assert span_overlap(ids, 20, [list(range(45, 57)), list(range(15, 28))])["windows"] == 0  # 12; across windows
    # a calibration article holding two consecutive evaluation rows (15 tokens; the tiny tokenizer drops the blank
    # line between them): no row equals a calibration text, yet the window overlaps
    article = f"It was late. {CHOICE_ROWS[2]['question']} {CHOICE_ROWS[3]['question']} tail, and it rained."
    result = evaluate(tiny_llama(), tiny_llama(), CHOICE_ROWS, ("perplexity",), {"dst_cal": [article]})
    found = result["overlap"]
    assert found["count"] == 0 and found["token_spans"] == {"span_tokens": 13, "windows": 1, "of": 1,
                                                            "fraction": 1.0}
    assert "1 of 1 perplexity windows share a 13-token span" in found["warning"]


def test_rows_and_models_that_do_not_fit_a_metric_are_named() -> None:
    with pytest.raises(InvalidSpec, match="accuracy needs rows with question, choices, answer; row 1"):
        evaluate(tiny_llama(), tiny_llama(), PAIR_ROWS, ("accuracy",))
    with pytest.raises(InvalidSpec, match="perplexity do not fit BertModel"):
        evaluate(tiny_bert(), tiny_bert(), PAIR_ROWS, ("perplexity",))
    with pytest.raises(InvalidSpec, match="label 'pos' is not a class"):
        evaluate(tiny_classifier(), tiny_classifier(), [{"text": "a", "label": "pos"}], ("macro_f1",))


def test_the_spec_refuses_unknown_metrics_and_evaluating_on_the_calibration_data() -> None:
    assert evaluation_refusal(["perplexity"], "LlamaForCausalLM") is None
    assert "sts_spearman do not fit LlamaForCausalLM (a causal LM); it can be measured with perplexity" in (
        evaluation_refusal(["sts_spearman"], "LlamaForCausalLM"))
    assert "(a kind no metric measures yet); it can be measured with none" in (
        evaluation_refusal(["embedding_cosine"], "BertForMaskedLM"))
    step = {"type": "quantize", "method": "gptq", "calibration": {"dataset_id": "dst_a"}}
    with pytest.raises(ValueError, match="'dst_a' is also a dataset the steps calibrate or train on"):
        JobSpec.model_validate({"steps": [step], "evaluate": {"dataset_id": "dst_a", "metrics": ["perplexity"]}})
    with pytest.raises(ValueError, match="lists a metric twice"):
        JobSpec.model_validate({"steps": [step], "evaluate": {"dataset_id": "b", "metrics": ["accuracy"] * 2}})
    with pytest.raises(ValueError, match="evaluate.metrics.0"):
        JobSpec.model_validate({"steps": [step], "evaluate": {"dataset_id": "b", "metrics": ["bleu"]}})

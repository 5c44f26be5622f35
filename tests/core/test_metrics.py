"""The metric functions the worker, tests and benchmarks share."""

from pathlib import Path

import pytest
import torch

from core.compression.metrics import (
    PROBE_SENTENCES,
    count_parameters,
    mean_cosine,
    median_latency_ms,
    model_outputs,
    output_cosine,
    probe_inputs,
    row_cosines,
    sentence_embeddings,
    weights_size_bytes,
)
from tests.models import save_model_folder, tiny_bert, tiny_llama, tiny_tokenizer


def test_weights_size_counts_only_safetensors(tmp_path: Path) -> None:
    folder = save_model_folder(tiny_bert(), tmp_path / "model")
    assert weights_size_bytes(folder) == (folder / "model.safetensors").stat().st_size
    assert (folder / "config.json").exists()


def test_tied_parameters_are_counted_once() -> None:
    model = tiny_llama()
    config = model.config
    embedding = config.vocab_size * config.hidden_size
    assert count_parameters(model) == sum(p.numel() for name, p in model.state_dict().items()) - embedding


def test_random_probe_is_deterministic_in_vocab_and_padded() -> None:
    model = tiny_llama()
    first, second = probe_inputs(model, seed=3), probe_inputs(model, seed=3)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert first["input_ids"].shape == (8, 64) and int(first["input_ids"].max()) < model.config.vocab_size
    lengths = first["attention_mask"].sum(dim=1)
    assert int(lengths[0]) == 64 and int(lengths[-1]) == 32
    assert not torch.equal(probe_inputs(model, seed=4)["input_ids"], first["input_ids"])


def test_text_probe_uses_the_fixed_sentences_truncated() -> None:
    inputs = probe_inputs(tiny_bert(), tiny_tokenizer(), batch=20, seq_len=12)
    assert inputs["input_ids"].shape == (20, 12)
    assert len(PROBE_SENTENCES) == 16
    assert torch.equal(inputs["input_ids"][0], inputs["input_ids"][16])
    short = PROBE_SENTENCES.index("Short sentence.")
    assert inputs["attention_mask"][short].tolist() == [1] * 5 + [0] * 7  # [CLS] short sentence . [SEP]


def test_text_probe_works_with_a_tokenizer_that_has_no_pad_token() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.pad_token = None
    inputs = probe_inputs(tiny_llama(), tokenizer)
    assert inputs["input_ids"].shape[0] == 8 and not bool(inputs["attention_mask"].all())


def test_outputs_are_logits_for_language_models_and_hidden_states_for_encoders() -> None:
    llama, bert = tiny_llama(), tiny_bert()
    assert model_outputs(llama, probe_inputs(llama)).shape == (8, 64, llama.config.vocab_size)
    assert model_outputs(bert, probe_inputs(bert)).shape == (8, 64, bert.config.hidden_size)


def test_output_cosine_ignores_masked_positions() -> None:
    reference = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    candidate = reference.clone()
    candidate[0, 3:] = -candidate[0, 3:]
    assert output_cosine(reference, candidate, mask) == pytest.approx(1.0)
    assert output_cosine(reference, candidate, torch.ones_like(mask)) == pytest.approx((8 - 2) / 10)


def test_sentence_embeddings_are_normalised_and_independent_of_padding() -> None:
    model, tokenizer = tiny_bert(), tiny_tokenizer()
    texts = list(PROBE_SENTENCES[:5])
    together = sentence_embeddings(model, tokenizer, texts, batch_size=5)
    alone = torch.cat([sentence_embeddings(model, tokenizer, [text]) for text in texts])
    assert together.shape == (5, model.config.hidden_size)
    torch.testing.assert_close(together.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_cosines_and_latency() -> None:
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 0.0]])
    assert row_cosines(a, b).tolist() == [1.0, 0.0]
    assert mean_cosine(a, b) == 0.5
    model = tiny_bert()
    assert median_latency_ms(model, probe_inputs(model, batch=1, seq_len=8), warmup=1, runs=3) > 0

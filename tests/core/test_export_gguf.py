"""`"export": ["gguf"]`: our codes carried into GGUF's block types, read back by the gguf package and transformers.

Each case compresses a tiny Llama with our pipeline, saves our artifact and exports it. The file is then read here
independently of the exporter: every tensor dequantized by `gguf.quants.dequantize` must equal our `load_compressed`
weight bit for bit (q_proj/k_proj rows permuted as llama.cpp's converter permutes them), and transformers' GGUF loader
must rebuild the same model (its logits equal ours) and the same tokenizer. llama.cpp itself is not run here (no
llama-cpp-python on this machine); the file follows the layout its converter writes.
"""

import io
import zipfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from gguf import MODEL_ARCH, GGUFReader, get_tensor_name_map
from gguf.quants import dequantize
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from core.compression.artifact import load_compressed, save_compressed
from core.compression.encoding import decode
from core.compression.execute import execute_job
from core.compression.exports import gguf as gguf_export
from core.compression.exports.gguf import GGUF_FILE, export_gguf, load_gguf
from core.compression.metrics import PROBE_SENTENCES
from core.compression.pipeline import StepHooks, run_pipeline
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext
from core.errors import UnsupportedModel
from core.service.db.repositories import JobRuns
from core.service.db.session import session_scope
from core.service.storage import get_store
from tests.fixtures.api import zip_folder
from tests.models import save_model_folder, tiny_bert, tiny_llama
from worker import tasks

G32 = {"type": "quantize", "granularity": "per_group", "group_size": 32}
CALIBRATION = {"num_samples": 2, "seq_len": 16}
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# name: (steps, the GGUF type of every quantized weight)
CASES: dict[str, tuple[list[dict[str, Any]], str]] = {
    "rtn-int8-g32": ([{**G32, "bits": 8}], "Q8_0"),
    "rtn-int4-g32": ([{**G32, "bits": 4}], "Q4_0"),
    "rtn-int5-g32": ([{**G32, "bits": 5}], "Q5_0"),
    "gptq-int4-g32": ([{"type": "quantize", "method": "gptq", "group_size": 32, "calibration": CALIBRATION}], "Q4_0"),
    # all 16 codes, negative scales: Q4_0's own rounding
    "gptq-int4-g32-full-range": ([{"type": "quantize", "method": "gptq", "group_size": 32, "full_range": True,
                                   "calibration": CALIBRATION}], "Q4_0"),
    "magnitude+rtn-int4-g32": ([{"type": "prune", "sparsity": 0.5}, {**G32, "bits": 4}], "Q4_0"),
    "mixed-4-8-g32": ([{"type": "quantize", "method": "mixed", "bits": [4, 8], "budget": {"avg_bits": 6.0},
                        "granularity": "per_group", "group_size": 32, "calibration": CALIBRATION}], "Q4_0+Q8_0"),
    # Q4_1's float16 minimum -zero_point * scale is not exact in every block: one bit wider, symmetric, exact.
    "rtn-int4-g32-asymmetric": ([{**G32, "bits": 4, "symmetric": False}], "Q5_0"),
    "rtn-int5-g32-asymmetric": ([{**G32, "bits": 5, "symmetric": False}], "Q8_0"),
}


def compress(steps: list[dict[str, Any]], tmp_path: Path) -> tuple[ModelState, Path]:
    state = ModelState(tiny_llama())
    run_pipeline(state, JobSpec(steps=steps, export=["gguf"]).steps, StepContext())
    return state, save_compressed(state, tmp_path / "artifact", {"job_id": "test"})


def converter_rows(name: str, weight: torch.Tensor, config: Any) -> torch.Tensor:
    """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py), written out here independently of the exporter."""
    if name.endswith("q_proj.weight"):
        heads = config.num_attention_heads
    elif name.endswith("k_proj.weight"):
        heads = config.num_key_value_heads
    else:
        return weight
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of the file: (GGML type name, values dequantized by the gguf package)."""
    return {t.name: (t.tensor_type.name, dequantize(t.data, t.tensor_type)) for t in GGUFReader(path).tensors}


def assert_bit_exact(artifact: Path, path: Path) -> dict[str, str]:
    """Each weight of our artifact equals its GGUF tensor bit for bit; returns {our name: GGML type}."""
    ours = load_compressed(artifact)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, ours.config.num_hidden_layers)
    stored = gguf_tensors(path)
    types = {}
    for name, weight in ours.state_dict().items():
        if name == "lm_head.weight" and ours.config.tie_word_embeddings:  # llama.cpp reads it from token_embd
            continue
        qtype, values = stored.pop(names.get_name(name, try_suffixes=(".weight",)))
        expected = converter_rows(name, weight, ours.config)
        theirs = torch.from_numpy(np.array(values)).reshape(expected.shape)
        assert torch.equal(theirs.view(torch.int32), expected.contiguous().view(torch.int32)), (name, qtype)
        types[name] = qtype
    assert not stored  # nothing else was written
    return types


@pytest.mark.parametrize("case", list(CASES))
def test_our_codes_dequantize_bit_for_bit_in_their_gguf_type(case: str, tmp_path: Path) -> None:
    steps, expected = CASES[case]
    state, artifact = compress(steps, tmp_path)
    export = export_gguf(artifact, artifact / GGUF_FILE)
    types = assert_bit_exact(artifact, export.path)
    quantized = {types[name] for name in state.encodings if name in types}
    # the 14 Linears of the blocks; the tied embedding / lm_head stays float unless a recipe names it
    assert quantized == set(expected.split("+")) and len(state.encodings) == 14
    assert {qtype for name, qtype in types.items() if name not in state.encodings} == {"F32"}  # norms
    assert export.tensor_types == {qtype: sum(1 for t in types.values() if t == qtype) for qtype in set(types.values())}
    assert ("one bit wider" in " ".join(export.notes)) == ("asymmetric" in case)
    pruned = [e for e in state.encodings.values() if e.format == "sparse_bitmask"]
    assert bool(pruned) == case.startswith("magnitude")  # pruned positions written as the zero code


@pytest.mark.parametrize(("bits", "qtype"), [(4, "Q4_1"), (5, "Q5_1")])
def test_asymmetric_codes_go_to_q4_1_and_q5_1_where_every_minimum_is_a_float16(bits: int, qtype: str,
                                                                               tmp_path: Path) -> None:
    state = ModelState(tiny_llama())
    run_pipeline(state, JobSpec(steps=[{**G32, "bits": bits, "symmetric": False}]).steps, StepContext())
    for name, encoding in state.encodings.items():  # keep the zero points whose -zero_point * scale is a float16
        scale, zero = encoding.tensors["scale"].float(), encoding.tensors["zero_point"]
        exact = (zero * scale).half().float() == zero * scale
        encoding.tensors["zero_point"] = torch.where(exact, zero, torch.full_like(zero, 2 ** (bits - 1)))
        state.model.get_parameter(name).data.copy_(decode(encoding))
    artifact = save_compressed(state, tmp_path / "artifact", {})
    export = export_gguf(artifact, artifact / GGUF_FILE)
    types = assert_bit_exact(artifact, export.path)
    assert {types[name] for name in state.encodings} == {qtype} and export.notes == [
        "the artifact has no tokenizer files, so the GGUF has no vocabulary (llama.cpp then takes token ids only)"]


def test_an_untied_head_is_written_as_output_weight(tmp_path: Path) -> None:
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    state = ModelState(LlamaForCausalLM(config).eval())
    run_pipeline(state, JobSpec(steps=[{**G32, "bits": 4, "targets": ["*", "lm_head"]}]).steps, StepContext())
    artifact = save_compressed(state, tmp_path / "artifact", {})
    export = export_gguf(artifact, artifact / GGUF_FILE)
    types = assert_bit_exact(artifact, export.path)
    assert types["lm_head.weight"] == "Q4_0" and types["model.embed_tokens.weight"] == "Q4_0"
    ids = torch.arange(24).view(2, 12)
    with torch.no_grad():
        assert torch.equal(load_gguf(export.path)(ids).logits, load_compressed(artifact)(ids).logits)


def gpt2_tokenizer() -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE over the probe sentences (vocab under tiny_llama's 512) with SmolLM2's special
    tokens and a chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(PROBE_SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = save_model_folder(tiny_llama(), tmp_path_factory.mktemp("llama") / "model")
    gpt2_tokenizer().save_pretrained(folder)
    return folder


def test_transformers_loads_our_weights_and_tokenizer_from_the_gguf(llama_folder: Path, tmp_path: Path) -> None:
    spec = JobSpec(steps=[{**G32, "bits": 4}], export=["gguf"])
    outcome = execute_job(llama_folder, spec, tmp_path / "work", StepContext(), StepHooks(), {"job_id": "test"})
    folder = tmp_path / "work" / "model"
    ours, theirs = load_compressed(folder), load_gguf(folder / GGUF_FILE)
    for name, weight in ours.named_parameters():  # transformers undoes the converter's q/k permutation
        assert torch.equal(theirs.get_parameter(name), weight), name
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)

    tokenizer = AutoTokenizer.from_pretrained(folder)
    from_gguf = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    for text in [*PROBE_SENTENCES, "<|im_start|>user\nHi there<|im_end|>"]:
        assert from_gguf(text).input_ids == tokenizer(text).input_ids
    fields = GGUFReader(folder / GGUF_FILE).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.chat_template"].contents() == CHAT_TEMPLATE  # llama.cpp reads it; transformers does not
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id == 1
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False  # this tokenizer adds none
    assert fields["tokenizer.ggml.token_type"].contents()[:3] == [3, 3, 3]  # the special tokens are CONTROL

    after = outcome.metrics["after"]
    assert after["gguf_output_cosine"] == pytest.approx(after["output_cosine"], abs=1e-6)
    assert after["gguf"]["artifact_output_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert after["gguf"]["tensor_types"] == {"F32": 6, "Q4_0": 14} and after["gguf"]["file_type"] == "MOSTLY_Q4_0"
    assert after["gguf"]["tokenizer"] == "gpt2/default"  # a tokenizer llama.cpp's converter does not name:
    assert "pre-tokenizer" in after["gguf"]["notes"][0]  # said so
    assert GGUF_FILE in zipfile.ZipFile(outcome.artifact).namelist()


def llama_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """A sentencepiece-style BPE (Llama 2, TinyLlama: "▁" for spaces, byte fallback) over the probe sentences."""
    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{byte:02X}>" for byte in range(256))]
    backend.train_from_iterator(PROBE_SENTENCES, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                                     show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_a_sentencepiece_style_tokenizer_goes_in_as_llama_vocabulary(tmp_path: Path) -> None:
    _, artifact = compress([{**G32, "bits": 8}], tmp_path)
    llama_bpe_tokenizer().save_pretrained(artifact)
    export = export_gguf(artifact, artifact / GGUF_FILE)
    assert export.tokenizer == "llama" and export.notes == []  # gguf.LlamaHfVocab, as the converter's fallback
    ours, from_gguf = AutoTokenizer.from_pretrained(artifact), AutoTokenizer.from_pretrained(artifact,
                                                                                         gguf_file=GGUF_FILE)
    for text in PROBE_SENTENCES:
        assert from_gguf(text).input_ids == ours(text).input_ids


def test_a_block_that_would_dequantize_differently_fails_the_export(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _, artifact = compress([{**G32, "bits": 4}], tmp_path)
    packed = gguf_export._low_nibbles
    monkeypatch.setattr(gguf_export, "_low_nibbles", lambda codes: packed(codes) ^ 1)  # one code off by one
    with pytest.raises(RuntimeError, match=r"blk.0.attn_q.weight \(Q4_0\) would dequantize to other values"):
        export_gguf(artifact, artifact / GGUF_FILE)
    assert sorted(path.name for path in artifact.glob("*.gguf*")) == []  # nothing left that would not decode


@pytest.mark.parametrize(("step", "reason"), [
    ({"type": "quantize"}, "not granularity per_channel; use granularity: per_group, group_size: 32"),
    ({"type": "quantize", "method": "gptq"}, "not group_size 128; use granularity: per_group, group_size: 32"),
    ({**G32, "bits": 3}, "no block type for 3-bit codes"),
    ({"type": "quantize", "method": "mixed", "bits": [4, 6], "granularity": "per_group", "group_size": 32},
     "no block type for 6-bit codes"),
    ({**G32, "bits": 8, "symmetric": False}, "use symmetric: true"),
    ({"type": "quantize", "method": "kmeans"}, "k-means codebook has no GGUF type"),
    ({"type": "quantize", "method": "fp8"}, "integer grids only"),
    ({"type": "quantize", "method": "dynamic"}, "W8A8"),
    ({"type": "prune", "method": "structured"}, "structurally pruned"),
    ({"type": "decompose", "method": "svd", "rank_ratio": 0.5}, "low-rank"),
    ({"type": "lora", "merge": False}, "unmerged LoRA"),
])
def test_recipes_gguf_cannot_hold_are_refused_at_submission_naming_what_to_use(step: dict[str, Any],
                                                                                reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        JobSpec(steps=[step], export=["gguf"])
    JobSpec(steps=[step])  # the same recipe without the export is fine


def test_entropy_coding_is_refused_and_every_export_can_be_asked_at_once() -> None:
    with pytest.raises(ValidationError, match="entropy-coded weights have no GGUF type"):
        JobSpec(steps=[{**G32, "bits": 4}, {"type": "encode"}], export=["gguf"])
    spec = JobSpec(steps=[{"type": "prune"}, {**G32, "bits": 4}, {"type": "lora"}],
                   export=["onnx", "compressed-tensors", "gguf"])
    assert spec.export == ["onnx", "compressed-tensors", "gguf"]


def test_what_only_the_model_tells_is_refused_at_export(tmp_path: Path) -> None:
    bert = ModelState(tiny_bert())
    run_pipeline(bert, JobSpec(steps=[{**G32, "bits": 4}]).steps, StepContext())
    with pytest.raises(UnsupportedModel, match="Llama-family causal LMs"):
        export_gguf(save_compressed(bert, tmp_path / "bert", {}), tmp_path / "bert.gguf")
    config = LlamaConfig(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    narrow = ModelState(LlamaForCausalLM(config).eval())  # rows of 48 columns: one and a half blocks
    run_pipeline(narrow, JobSpec(steps=[{**G32, "bits": 4}]).steps, StepContext())
    with pytest.raises(UnsupportedModel, match="48 input columns are not whole blocks of 32"):
        export_gguf(save_compressed(narrow, tmp_path / "narrow", {}), tmp_path / "narrow.gguf")
    assert not (tmp_path / "narrow.gguf").exists()


def test_a_job_through_the_api_and_the_worker_ships_the_gguf(client: TestClient, auth: dict[str, str],
                                                              upload: Callable[..., dict], llama_folder: Path,
                                                              tmp_path: Path) -> None:
    bert = client.post("/v1/jobs", json={"model_id": upload()["id"], "steps": [{**G32, "bits": 4}],
                                         "export": ["gguf"]}, headers=auth)
    assert bert.status_code == 422 and "Llama-family causal LMs (LlamaForCausalLM), not BertModel" in bert.text
    files = {"file": ("llama.zip", zip_folder(llama_folder), "application/zip")}
    model_id = client.post("/v1/models", files=files, headers=auth).json()["id"]
    refused = client.post("/v1/jobs", json={"model_id": model_id, "steps": [{"type": "quantize", "method": "gptq"}],
                                            "export": ["gguf"]}, headers=auth)
    assert refused.status_code == 422 and "group_size: 32" in refused.text
    body = {"model_id": model_id, "steps": [{**G32, "bits": 8}], "export": ["gguf"]}
    job_id = client.post("/v1/jobs", json=body, headers=auth).json()["id"]
    with session_scope() as session:  # run it in this process as the worker does
        job = JobRuns(session).claim(job_id, timedelta(seconds=60), max_attempts=3)
        session.expunge(job)
    tasks._execute(job, get_store(), tmp_path / "work")
    result = client.get(f"/v1/jobs/{job_id}", headers=auth).json()
    assert result["status"] == "succeeded", result
    gguf = result["metrics"]["after"]["gguf"]
    assert gguf["tensor_types"] == {"F32": 6, "Q8_0": 14} and gguf["artifact_output_cosine"] == pytest.approx(1.0)
    archive = client.get(f"/v1/artifacts/{result['artifacts'][0]['id']}", headers=auth).content
    names = zipfile.ZipFile(io.BytesIO(archive)).namelist()
    assert GGUF_FILE in names

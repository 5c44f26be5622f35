"""`"export": ["onnx"]` of weight-only integer layers: com.microsoft MatMulNBits with our codes, scales and zero points.

Each MatMulNBits node is checked by ONNX Runtime itself: a one-node graph fed the identity matrix returns the weight
its kernel dequantizes, which must equal our `load_compressed` weight (float tolerance of the kernel's arithmetic,
while the stored codes and scales are compared exactly). The packing convention is checked against onnxruntime's
own quantizer (`MatMulNBitsQuantizer`), and the whole exported model's outputs against our loaded artifact's.
"""

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from core.compression.artifact import load_compressed, read_manifest, save_compressed, stored_encodings
from core.compression.execute import execute_job
from core.compression.exports.onnx import export_onnx
from core.compression.exports.onnx_nbits import (
    NBitsPlan,
    NBitsWeight,
    dequantize_nbits,
    pack_zero_points,
    plan_nbits,
    unpack_nbits,
)
from core.compression.metrics import model_outputs, probe_inputs
from core.compression.pipeline import StepHooks, run_pipeline
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext
from tests.models import save_model_folder, tiny_bert, tiny_llama

G = {"type": "quantize", "granularity": "per_group"}
# name: (steps, model, expected {"<bits>-bit/block <size>": layers} of the tiny model's Linear modules)
CASES: dict[str, tuple[list[dict[str, Any]], Any, dict[str, int]]] = {
    "rtn-int4-g32": ([{**G, "bits": 4, "group_size": 32}], tiny_llama, {"4-bit/block 32": 14}),
    "rtn-int4-g16-asymmetric": ([{**G, "bits": 4, "group_size": 16, "symmetric": False}], tiny_llama,
                                {"4-bit/block 16": 14}),
    "rtn-int8-per-channel": ([{"type": "quantize", "bits": 8}], tiny_bert,
                             {"8-bit/block 64": 11, "8-bit/block 128": 2}),
    "rtn-int2-g32": ([{**G, "bits": 2, "group_size": 32}], tiny_llama, {"2-bit/block 32": 14}),
    "rtn-int3-g32-widened": ([{**G, "bits": 3, "group_size": 32, "symmetric": False}], tiny_llama,
                             {"4-bit/block 32": 14}),
    "rtn-int4-per-channel": ([{"type": "quantize", "bits": 4, "granularity": "per_channel"}], tiny_llama, None),
    "magnitude+rtn-int4-g32": ([{"type": "prune", "sparsity": 0.5}, {**G, "bits": 4, "group_size": 32}], tiny_llama,
                               {"4-bit/block 32": 14}),
}


def compress(steps: list[dict[str, Any]], build: Any, folder: Path) -> Path:
    state = ModelState(build())
    run_pipeline(state, JobSpec(steps=steps, export=["onnx"]).steps, StepContext())
    return save_compressed(state, folder, {"job_id": "test"})


def plan_for(folder: Path, model: torch.nn.Module) -> NBitsPlan:
    return plan_nbits(model, stored_encodings(folder), read_manifest(folder).aliases)


def single_op(weight: NBitsWeight, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """ONNX Runtime's MatMulNBits of one weight, given its initializers, on `inputs["A"]`."""
    initializers = {"B": weight.packed, "S": weight.scales}
    if weight.zero_points is not None:
        initializers["Z"] = weight.zero_points
    node = helper.make_node("MatMulNBits", ["A", *initializers], ["Y"], domain="com.microsoft", K=weight.K,
                            N=weight.N, bits=weight.bits, block_size=weight.block_size)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, weight.K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, weight.N])],
                              [numpy_helper.from_array(value, name) for name, value in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft",
                                                                                                      1)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def single_gather(weight: NBitsWeight) -> np.ndarray:
    """ONNX Runtime's GatherBlockQuantized of every row of one embedding table."""
    initializers = {"D": weight.packed.reshape(weight.N, -1), "S": weight.scales.reshape(weight.N, -1)}
    if weight.zero_points is not None:
        initializers["Z"] = weight.zero_points.reshape(weight.N, -1)
    node = helper.make_node("GatherBlockQuantized", ["D", "I", "S", *initializers.keys() - {"D", "S"}], ["Y"],
                            domain="com.microsoft", gather_axis=0, quantize_axis=1, block_size=weight.block_size,
                            bits=weight.bits)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("I", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(value, name) for name, value in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft",
                                                                                                      1)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"I": np.arange(weight.N, dtype=np.int64)})[0]


@pytest.mark.parametrize("case", list(CASES))
def test_matmul_nbits_carries_our_weights_exactly(case: str, tmp_path: Path) -> None:
    steps, build, expected_kinds = CASES[case]
    folder = compress(steps, build, tmp_path / "artifact")
    loaded = load_compressed(folder)
    plan = plan_for(folder, loaded)
    assert not plan.float
    if expected_kinds is not None:
        assert plan.summary()["matmul_nbits"] == expected_kinds
    else:  # per-channel: K = 64 columns per block, the row's scale in every block
        assert {(w.bits, w.block_size) for w in plan.weights.values()} == {(4, 64), (4, 128)}
    modules = dict(loaded.named_modules())
    for name, weight in plan.weights.items():
        ours = modules[name].weight.detach().numpy()
        # the operator's formula on the stored initializers gives our decoded weight bit for bit ...
        assert np.array_equal(dequantize_nbits(weight).view(np.uint32), ours.view(np.uint32)), name
        # ... and ORT's kernel, fed the identity, returns it (its float arithmetic: within float tolerance)
        kernel = single_op(weight, {"A": np.eye(weight.K, dtype=np.float32)}).T
        np.testing.assert_allclose(kernel, ours, rtol=1e-6, atol=1e-7 * float(np.abs(ours).max()), err_msg=name)
        if weight.sparse:  # pruned positions decode to exactly 0
            assert np.all(kernel[ours == 0] == 0)
    for name, weight in plan.embeddings.items():  # quantized embeddings (BERT's here): GatherBlockQuantized
        ours = modules[name].weight.detach().numpy()
        assert np.array_equal(dequantize_nbits(weight).view(np.uint32), ours.view(np.uint32)), name
        np.testing.assert_array_equal(single_gather(weight), ours, err_msg=name)
    assert len(plan.embeddings) == (3 if build is tiny_bert else 0)  # Llama's embedding: tied head, left float


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, False), (2, False)])
def test_packing_matches_onnxruntime_quantizer(bits: int, symmetric: bool, tmp_path: Path) -> None:
    """ORT's own quantizer packs a weight; our unpacking of its bytes, dequantized by our formula, equals what its
    kernel computes, and our packing of those codes gives back its bytes."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    K, N, block = 96, 48, 32  # K not a multiple of... 3 blocks: an odd count exercises zero-point row padding
    weight = np.random.default_rng(bits).standard_normal((K, N)).astype(np.float32)  # MatMul's B is K x N
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"])], "g",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, N])],
                              [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    quantized = quantizer.model.model
    [node] = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"]
    inits = {i.name: numpy_helper.to_array(i) for i in quantized.graph.initializer}
    packed, scales = inits[node.input[1]], inits[node.input[2]]
    zero_points = inits[node.input[3]] if len(node.input) > 3 and node.input[3] else None
    blocks = -(-K // block)
    assert packed.shape == (N, blocks, block * bits // 8)
    codes, zeros = unpack_nbits(packed, zero_points, bits, N, blocks, block)
    ours = NBitsWeight(K, N, bits, block, packed, scales.astype(np.float32), zero_points, bits)
    kernel = single_op(ours, {"A": np.eye(K, dtype=np.float32)}).T
    np.testing.assert_allclose(dequantize_nbits(ours), kernel, rtol=1e-6, atol=1e-6)
    from core.compression.quant.packing import pack_bits

    assert np.array_equal(pack_bits(torch.from_numpy(codes), bits).numpy().reshape(packed.shape), packed)
    if zero_points is not None:
        assert np.array_equal(pack_zero_points(zeros, bits), zero_points.reshape(-1))


@pytest.mark.parametrize(("build", "steps"), [
    (tiny_llama, [{**G, "bits": 4, "group_size": 32}]),
    (tiny_bert, [{**G, "bits": 4, "group_size": 32, "symmetric": False}]),
])
def test_exported_model_matches_loaded_artifact(build: Any, steps: list[dict[str, Any]], tmp_path: Path) -> None:
    folder = compress(steps, build, tmp_path / "artifact")
    loaded = load_compressed(folder)
    plan = plan_for(folder, loaded)
    path = export_onnx(loaded, tmp_path / "onnx", probe_inputs(loaded, batch=2, seq_len=16), plan)
    graph = onnx.load(str(path)).graph
    assert sum(node.op_type == "MatMulNBits" for node in graph.node) == len(plan.weights) > 0
    assert sum(node.op_type == "GatherBlockQuantized" for node in graph.node) == len(plan.embeddings)
    assert all(type(m).__name__ != "NBitsLinear" for m in loaded.modules())  # the model was given back
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = probe_inputs(loaded, batch=3, seq_len=24, seed=1)
    feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
    expected = model_outputs(loaded, inputs)
    actual = torch.from_numpy(session.run(None, feeds)[0])
    torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)


def test_job_reports_onnx_size_and_notes(tmp_path: Path) -> None:
    """A 4-bit job's ONNX is smaller than the fp32 ONNX of the original, its size and notes in the metrics; a pruned
    job's notes say the sparse weights are dense in ONNX."""
    model_dir = save_model_folder(tiny_llama(), tmp_path / "model")
    original = export_onnx(load_compressed_or_plain(model_dir), tmp_path / "fp32", probe_inputs(tiny_llama()))
    spec = JobSpec(steps=[{"type": "prune", "sparsity": 0.5}, {**G, "bits": 4, "group_size": 32}], export=["onnx"])
    outcome = execute_job(model_dir, spec, tmp_path / "work", StepContext(), StepHooks(), {"job_id": "t"})
    after = outcome.metrics["after"]
    assert 0 < after["onnx_bytes"] < original.stat().st_size
    assert after["onnx"]["matmul_nbits_layers"] == 14
    # a causal LM's export is its KV-cache graph, whose greedy tokens were checked against the torch artifact's
    assert after["onnx"]["file"] == "model_with_past.onnx" and after["onnx"]["greedy_tokens_match_torch"] is True
    assert after["onnx_output_cosine"] == pytest.approx(after["output_cosine"], abs=1e-5)  # the artifact's quality
    assert any("sparse weights stay dense in ONNX" in note for note in after["onnx"]["notes"])


def load_compressed_or_plain(folder: Path) -> torch.nn.Module:
    from core.compression.modelio import load_model

    return load_model(folder, "cpu")


def test_kv_cache_export_generates_greedily_like_transformers(tmp_path: Path) -> None:
    """The KV-cache graph (MatMulNBits layers, past_key_values.{i}.key/value in, present.{i}.* out) generates in a
    plain ONNX Runtime greedy loop the same tokens as transformers' generate on the loaded artifact."""
    from core.compression.exports.onnx import export_onnx_with_past, greedy_generate_onnx

    folder = compress([{**G, "bits": 4, "group_size": 32}], tiny_llama, tmp_path / "artifact")
    loaded = load_compressed(folder)
    plan = plan_for(folder, loaded)
    path = export_onnx_with_past(loaded, tmp_path / "onnx", plan)
    graph = onnx.load(str(path)).graph
    assert sum(node.op_type == "MatMulNBits" for node in graph.node) == len(plan.weights)
    assert [i.name for i in graph.input][:4] == ["input_ids", "attention_mask", "past_key_values.0.key",
                                                 "past_key_values.0.value"]
    generator = torch.Generator().manual_seed(3)
    for length in (1, 5, 9):
        prompt = torch.randint(0, 512, (1, length), generator=generator)
        with torch.no_grad():
            expected = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                       do_sample=False, pad_token_id=0)[0, length:].tolist()
        assert greedy_generate_onnx(path, prompt[0].tolist(), 12) == expected
    # a random tiny model repeats one token: the logits of each cached step are compared too (batch 2)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()][2:]
    feeds = {name: np.zeros((2, 2, 0, 16), dtype=np.float32) for name in names}
    tokens = torch.randint(0, 512, (2, 9), generator=generator)
    for start, stop in ((0, 6), (6, 7), (7, 9)):  # prompt, one token, two tokens, each with the cache so far
        logits, *cache = session.run(None, {"input_ids": tokens[:, start:stop].numpy(),
                                            "attention_mask": np.ones((2, stop), dtype=np.int64), **feeds})
        feeds = dict(zip(names, cache, strict=True))
        with torch.no_grad():
            expected_logits = loaded(tokens[:, :stop]).logits[:, start:stop]
        torch.testing.assert_close(torch.from_numpy(logits), expected_logits, atol=1e-4, rtol=1e-4)


def test_kv_cache_generation_stops_at_the_end_token_like_transformers(tmp_path: Path) -> None:
    """Where the end token is the argmax, the ONNX loop given the model's `eos_token_id` stops there as generate
    does; run on without a stop it equals the torch KV-cache argmax loop. generate with `min_new_tokens` is no greedy
    reference: it hides the end token (issue 21's SmolLM2 benchmark counted 15/20 prompts because of it)."""
    from core.compression.exports.onnx import export_onnx_with_past, greedy_generate_onnx
    from core.compression.runtimes import torch_greedy

    folder = compress([{**G, "bits": 4, "group_size": 32}], tiny_llama, tmp_path / "artifact")
    loaded = load_compressed(folder)
    path = export_onnx_with_past(loaded, tmp_path / "onnx", plan_for(folder, loaded))
    prompt = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        steps = torch_greedy(loaded, prompt, 11)[1]
    assert greedy_generate_onnx(path, prompt[0].tolist(), 12) == steps
    loaded.generation_config.eos_token_id = [steps[1], 511]  # the second greedy token ends the text
    with torch.no_grad():
        expected = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                   do_sample=False, pad_token_id=0)[0, 7:].tolist()
        hidden = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                 min_new_tokens=12, do_sample=False, pad_token_id=0)[0, 7:].tolist()
    assert expected[-1] == steps[1] and len(expected) < 12
    assert greedy_generate_onnx(path, prompt[0].tolist(), 12, loaded.generation_config.eos_token_id) == expected
    assert steps[1] not in hidden and hidden != steps

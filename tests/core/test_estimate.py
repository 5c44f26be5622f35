"""The pre-flight estimate: a pure function of the model's size and the recipe's step configs."""

import pytest

from core.compression.configs.distill import Distill
from core.compression.configs.quantize import QuantizeGPTQ, QuantizeRTN
from core.compression.estimate import GB, ModelFacts, estimate_job

GIB = 1024**3


def llama(params: float) -> ModelFacts:
    return ModelFacts(num_parameters=int(params), weight_bytes=int(2 * params))  # bf16


@pytest.mark.parametrize(("params", "measured_peak"), [(0.40e9, 3.42 * GB), (1.10e9, 7.01 * GB)])
def test_rtn_in_memory_within_25_percent_of_measured_peak(params: float, measured_peak: float) -> None:
    # measured on the in-memory path (streaming off), which 1.1 B in bf16 (2.2 GB) would otherwise take
    estimate = estimate_job(llama(params), [QuantizeRTN], "cpu", streaming_threshold=100 * GIB)
    assert estimate.engine == "in_memory"
    assert abs(estimate.peak_host_bytes - measured_peak) / measured_peak < 0.25


def test_peak_and_time_grow_with_the_model() -> None:
    sizes = [estimate_job(llama(p), [QuantizeGPTQ], "cpu", 2 * GIB) for p in (1e8, 1e9, 7e9)]
    assert sizes[0].peak_host_bytes < sizes[1].peak_host_bytes < sizes[2].peak_host_bytes
    assert sizes[0].seconds < sizes[1].seconds < sizes[2].seconds


def test_large_rtn_streams_in_about_a_gigabyte() -> None:
    estimate = estimate_job(llama(7e9), [QuantizeRTN], "cpu", streaming_threshold=2 * GIB)
    assert estimate.engine == "streaming"
    assert estimate.peak_host_bytes < estimate_job(llama(7e9), [QuantizeGPTQ], "cpu", 2 * GIB).peak_host_bytes / 10


def test_streaming_needs_every_step_to_stream_and_a_model_above_the_threshold() -> None:
    assert estimate_job(llama(7e9), [QuantizeRTN, QuantizeGPTQ], "cpu", 2 * GIB).engine == "in_memory"
    assert estimate_job(llama(0.5e9), [QuantizeRTN], "cpu", 2 * GIB).engine == "in_memory"


def test_training_needs_more_than_a_calibrated_step_which_needs_more_than_rtn() -> None:
    rtn, gptq, distill = (estimate_job(llama(1e9), [step], "cpu", 100 * GIB) for step in
                          (QuantizeRTN, QuantizeGPTQ, Distill))
    assert rtn.peak_host_bytes < gptq.peak_host_bytes < distill.peak_host_bytes
    assert rtn.seconds < gptq.seconds < distill.seconds


def test_gpu_memory_only_for_a_cuda_job() -> None:
    assert estimate_job(llama(1e9), [QuantizeGPTQ], "cpu", 2 * GIB).peak_gpu_bytes == 0
    assert estimate_job(llama(1e9), [QuantizeGPTQ], "cuda", 2 * GIB).peak_gpu_bytes > 4e9


def test_a_7b_gptq_on_a_cpu_is_estimated_past_the_one_hour_default_limit() -> None:
    assert estimate_job(llama(7e9), [QuantizeGPTQ], "cpu", 2 * GIB).seconds > 3600

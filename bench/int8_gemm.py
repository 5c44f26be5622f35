"""Per-shape speed of the int8 GEMM kernels the dynamic modules can run (oneDNN's and fbgemm's
`quantized::linear_dynamic`) beside fp32 `F.linear`, on all-MiniLM-L6-v2's Linear shapes at batch 8 x 128 tokens.

Run: `.venv/bin/python -m bench.int8_gemm`. Writes its section of docs/benchmarks.md; it has no target (it backs
the choice of kernel in docs/decisions.md).
"""

import statistics
import time
import warnings
from collections.abc import Callable

import torch

from bench.report import load_average, machine_description, markdown_table, update_section
from core.compression.int8.layers import _quantized_engine, _quantized_weight
from core.compression.shipped import LATENCY_BATCH, LATENCY_TOKENS, THREADS

NAME = "int8_gemm"
COMMAND = f".venv/bin/python -m bench.{NAME}"
SHAPES = [(384, 384), (384, 1536), (1536, 384)]  # (in, out): attention, FFN up, FFN down
CALLS = 100


def ms_per_call(call: Callable[[], object]) -> float:
    for _ in range(5):
        call()
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(CALLS // 5):
            call()
        rounds.append((time.perf_counter() - start) / (CALLS // 5) * 1e3)
    return statistics.median(rounds)


def shape_row(in_features: int, out_features: int) -> list[str]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(LATENCY_BATCH, LATENCY_TOKENS, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    scale = weight.abs().amax(dim=1) / 127
    codes = torch.round(weight / scale[:, None]).to(torch.int8)
    row = [f"{in_features} → {out_features}", f"{ms_per_call(lambda: torch.nn.functional.linear(x, weight, bias)):.3f}"]
    for engine in ("onednn", "fbgemm"):
        if engine not in torch.backends.quantized.supported_engines:
            row.append("—")
            continue
        with warnings.catch_warnings(), _quantized_engine(engine):
            warnings.simplefilter("ignore")
            packed = torch.ops.quantized.linear_prepack(_quantized_weight(codes, scale), bias)
        row.append(f"{ms_per_call(lambda p=packed: torch.ops.quantized.linear_dynamic(x, p, False)):.3f}")
    return row


def main() -> None:
    torch.set_num_threads(THREADS)
    table = markdown_table(["Linear (in → out)", "fp32 ms", "oneDNN int8 ms", "fbgemm int8 ms"],
                           [shape_row(i, o) for i, o in SHAPES])
    body = f"""## int8 GEMM kernels on MiniLM's Linear shapes

Reproduce: `{COMMAND}`

Machine: {machine_description()}; load average when it ended: {load_average()}; AMX: \
{torch.cpu._is_amx_tile_supported()}.

{table}

- One `quantized::linear_dynamic` call (activations quantized inside) on {LATENCY_BATCH} × {LATENCY_TOKENS} tokens,
  per-channel int8 weights packed under each engine, vs fp32 `F.linear`; median of 5 rounds of {CALLS // 5} calls.
- `DynamicInt8Linear` packs with oneDNN where the CPU has AMX, with fbgemm elsewhere (docs/decisions.md).
"""
    update_section(NAME, body)
    print(body)


if __name__ == "__main__":
    main()

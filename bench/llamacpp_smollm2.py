"""SmolLM2-135M in llama.cpp itself (llama-cpp-python), all in one run:

- our gptq int4 g32 GGUF (Q4_0 blocks on all 16 codes, `full_range`; embedding Q8_0): its perplexity in
  llama.cpp against the same artifact's in PyTorch (target: within 1%), and against llama.cpp's own `Q4_0`
  quantization (`llama_model_quantize`) of the F16 GGUF (target: ours is lower);
- our rtn int8 g32 GGUF (Q8_0): perplexity in llama.cpp against the artifact's in PyTorch;
- decode tokens/s of each GGUF against the F16 GGUF (target for our Q4: at least 1.5x), greedy, one token per
  `eval` after a 64-token prompt, the median of 3 runs of 128 tokens.

The F16 GGUF is SmolLM2's fp32 weights rounded to float16, written by our exporter (`export_gguf`, which writes F16
when every value is exact in it). Perplexity: the first 4,096 tokens of gensim's lee_background.cor in 512-token
windows, scored on the same token ids in both runtimes (core.compression.metrics.perplexity's definition).

Timings: run it alone (no helper, test or CI on the machine); the load average is printed with the figures.
Run: `.venv/bin/python -m bench.llamacpp_smollm2` (needs the `bench-llm` and `llamacpp` extras; llama-cpp-python
builds llama.cpp from source, about 20 min on 2 cores). Writes its section of docs/benchmarks.md; exits 1 when a
target is missed.
"""

import ctypes
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from bench.gguf_smollm2 import RECIPES as GGUF_RECIPES
from bench.report import load_average, machine_description, markdown_table, update_section
from bench.smollm2 import EVAL_TOKENS, EVAL_WINDOW, news_token_ids, smollm2_folder
from core.compression.artifact import load_compressed, save_compressed
from core.compression.evaluate import paired_bootstrap, token_weighted_perplexity
from core.compression.exports.gguf import GGUF_FILE, export_gguf
from core.compression.metrics import perplexity
from core.compression.modelio import load_model
from core.compression.pipeline import run_pipeline
from core.compression.presets import PRESETS
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext

NAME = "llamacpp_smollm2"
COMMAND = f".venv/bin/python -m bench.{NAME}"
THREADS = 2
GPTQ, INT8 = "the gguf-q4 preset: gptq int4 g32 full-range symmetric (+ rtn int8 g32 embedding)", "rtn int8 g32"
# The gguf-q4 preset: gptq on all 16 codes (Q4_0's own rounding, as llama.cpp's quantizer uses them)
RECIPES = {INT8: GGUF_RECIPES[INT8], GPTQ: PRESETS["gguf-q4"].steps}
PROMPT_TOKENS, DECODE_TOKENS, RUNS = 64, 128, 3
# 32 windows of the news text: over the 8 windows of EVAL_TOKENS the CI of ours / llama.cpp's Q4_0 was ±3%
PPL_TOKENS = 4 * EVAL_TOKENS
TARGETS = {"ppl_vs_torch": 0.01, "decode_vs_f16": 1.5}


@dataclass
class Row:
    name: str
    size_bytes: int
    llamacpp_ppl: float
    torch_ppl: float | None  # the artifact's in PyTorch; None for the GGUFs that are not our artifacts
    decode_tok_s: float
    types: str = ""  # the GGUF's tensor types and counts
    windows: np.ndarray | None = None  # (windows, 2): summed NLL and tokens of each window, in llama.cpp


def tensor_types(path: Path) -> str:
    from collections import Counter

    from gguf import GGUFReader

    counts = Counter(tensor.tensor_type.name for tensor in GGUFReader(path).tensors)
    return ", ".join(f"{name} {count}" for name, count in sorted(counts.items()))


def main() -> int:
    from llama_cpp import __version__ as llamacpp_version

    torch.set_num_threads(THREADS)
    folder = smollm2_folder()
    tokens = news_token_ids(AutoTokenizer.from_pretrained(folder, local_files_only=True), limit=PPL_TOKENS)
    prompt = tokens[:PROMPT_TOKENS].tolist()
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        work = Path(tmp)
        f16 = f16_gguf(folder, work)
        theirs = llamacpp_q4_0(f16, work / "llamacpp-q4_0.gguf")
        rows = [measure("F16 (fp32 rounded to float16, our exporter)", f16, None, tokens, prompt),
                measure("llama.cpp's own Q4_0 of the F16 GGUF", theirs, None, tokens, prompt)]
        for name in (GPTQ, INT8):
            path, torch_ppl = our_gguf(name, folder, work, tokens)
            rows.append(measure(f"ours: {name}", path, torch_ppl, tokens, prompt))
            print(rows[-1], flush=True)
    return publish(rows, llamacpp_version, load_average())


def measure(name: str, path: Path, torch_ppl: float | None, tokens: torch.Tensor, prompt: list[int]) -> Row:
    windows = llamacpp_windows(path, tokens)
    return Row(name, path.stat().st_size, token_weighted_perplexity(windows), torch_ppl, decode_rate(path, prompt),
               tensor_types(path), windows)


def f16_gguf(folder: Path, work: Path) -> Path:
    model = load_model(folder)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(parameter.half().float())  # every value exact in float16: the exporter writes F16
    artifact = save_compressed(ModelState(model=model), work / "f16", {"benchmark": NAME}, source_dir=folder)
    return export_gguf(artifact, work / "f16.gguf").path


def llamacpp_q4_0(f16: Path, out: Path) -> Path:
    """llama.cpp's own quantizer (what `llama-quantize model.gguf out.gguf Q4_0` does)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, THREADS
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError("llama_model_quantize failed")
    return out


def our_gguf(name: str, folder: Path, work: Path, tokens: torch.Tensor) -> tuple[Path, float]:
    """The recipe's artifact exported to GGUF (bit-exact, checked by export_gguf), and its perplexity in PyTorch."""
    state = ModelState(model=load_model(folder))
    run_pipeline(state, JobSpec(steps=RECIPES[name], export=["gguf"]).steps, StepContext())
    folder_name = "gptq" if name == GPTQ else "int8"
    artifact = save_compressed(state, work / folder_name, {"benchmark": NAME}, source_dir=folder)
    del state
    path = export_gguf(artifact, artifact / GGUF_FILE).path
    return path, perplexity(load_compressed(artifact), tokens)


def _llama(path: Path, logits_all: bool):  # noqa: ANN202 (llama_cpp is an optional extra)
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=EVAL_WINDOW, n_batch=EVAL_WINDOW, n_ubatch=EVAL_WINDOW,
                 n_threads=THREADS, n_threads_batch=THREADS, logits_all=logits_all, verbose=False)


def llamacpp_windows(path: Path, tokens: torch.Tensor) -> np.ndarray:
    """Summed NLL and token count of each of `core.compression.metrics.perplexity`'s windows, from llama.cpp's
    logits (the service's evaluation keeps the same pairs for its bootstrap)."""
    llm, ids = _llama(path, logits_all=True), tokens.tolist()
    windows = []
    for start in range(0, len(ids) - 1, EVAL_WINDOW):
        chunk = ids[start:start + EVAL_WINDOW]
        if len(chunk) < 2:
            break
        llm.reset()
        llm.eval(chunk)
        logits = torch.from_numpy(np.array(llm.scores[:len(chunk)], dtype=np.float32))
        windows.append((F.cross_entropy(logits[:-1], torch.tensor(chunk[1:]), reduction="sum").item(), len(chunk) - 1))
    llm.close()
    return np.array(windows, dtype=np.float64)


def decode_rate(path: Path, prompt: list[int]) -> float:
    """Greedy decode tokens/s: one `eval` per token after the prompt; the median of RUNS runs."""
    llm, rates = _llama(path, logits_all=False), []
    for _ in range(RUNS):
        llm.reset()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        start = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        rates.append(DECODE_TOKENS / (time.perf_counter() - start))
    llm.close()
    return statistics.median(rates)


def ratio_ci(base: Row, other: Row) -> tuple[float, list[float | None]]:
    """other's PPL / base's, and its paired-bootstrap 95% CI over the windows (core.compression.evaluate's)."""
    assert base.windows is not None and other.windows is not None
    before, after = paired_bootstrap(base.windows, other.windows, token_weighted_perplexity)
    ratio = other.llamacpp_ppl / base.llamacpp_ppl
    low, high = np.percentile(after / before, [2.5, 97.5])
    return ratio, [float(low), float(high)]


def publish(rows: list[Row], llamacpp_version: str, load: str) -> int:
    f16, theirs, gptq, int8 = rows
    versus, interval = ratio_ci(theirs, gptq)
    windows = 0 if gptq.windows is None else len(gptq.windows)
    checks = {
        f"gptq Q4_0 GGUF: llama.cpp PPL within {TARGETS['ppl_vs_torch']:.0%} of the artifact's PPL in PyTorch":
            abs(gptq.llamacpp_ppl / (gptq.torch_ppl or 1) - 1) <= TARGETS["ppl_vs_torch"],
        f"gptq Q4_0 GGUF: llama.cpp PPL below llama.cpp's own Q4_0 of the F16 GGUF (ours / theirs {versus:.4f}, "
        f"paired-bootstrap 95% CI over the {windows} windows [{interval[0]:.4f}, {interval[1]:.4f}]"
        f"{'' if (interval[1] or 1) < 1 else ': the CI reaches 1, so not shown beyond noise'})":
            gptq.llamacpp_ppl < theirs.llamacpp_ppl,
        f"gptq Q4_0 GGUF: decode ≥ {TARGETS['decode_vs_f16']}× the F16 GGUF":
            gptq.decode_tok_s >= TARGETS["decode_vs_f16"] * f16.decode_tok_s,
        f"int8 Q8_0 GGUF: llama.cpp PPL within {TARGETS['ppl_vs_torch']:.0%} of the artifact's PPL in PyTorch":
            abs(int8.llamacpp_ppl / (int8.torch_ppl or 1) - 1) <= TARGETS["ppl_vs_torch"],
    }
    table = [[r.name, r.types, f"{r.size_bytes / 1e6:.1f}", f"{r.llamacpp_ppl:.3f}",
              f"{r.torch_ppl:.3f} ({r.llamacpp_ppl / r.torch_ppl - 1:+.2%})" if r.torch_ppl else "n/a",
              f"{r.decode_tok_s:.1f}", f"{r.decode_tok_s / f16.decode_tok_s:.2f}×"] for r in rows]
    verdicts = "\n".join(f"- {check}: {'met' if ok else 'NOT met'}" for check, ok in checks.items())
    body = f"""## SmolLM2-135M in llama.cpp: perplexity and decode speed of our GGUFs

Reproduce (alone on the machine): `{COMMAND}`

Machine: {machine_description()}; llama-cpp-python {llamacpp_version} built from source on this CPU, {THREADS}
threads. Load average while timing: {load}.

{markdown_table(["GGUF", "tensor types", "MB", "PPL in llama.cpp", "artifact PPL in PyTorch (llama.cpp vs it)",
                 "decode tok/s", "vs F16"], table)}

{verdicts}

- Same run, same machine: the F16 GGUF is the baseline of every speed ratio. Decode: greedy, a {PROMPT_TOKENS}-token
  prompt then {DECODE_TOKENS} tokens one `eval` at a time, median of {RUNS} runs.
- PPL: first {PPL_TOKENS} tokens of gensim's `lee_background.cor`, {EVAL_WINDOW}-token windows, the same token ids
  in llama.cpp (logits of every position) and in PyTorch. llama.cpp's CPU kernels quantize activations to 8 bits
  for Q4_0/Q8_0 dot products, which is the small difference from PyTorch.
- llama.cpp's own Q4_0 (`llama_model_quantize`, as `llama-quantize ... Q4_0`) keeps the tied embedding/output
  matrix wider (it asks for Q6_K, whose 256-wide blocks do not divide SmolLM2's 576 columns, and falls back, see
  the tensor types); ours keeps it at Q8_0 (the recipe's `rtn int8 g32` on the embedding).
- Recipes: {"; ".join(f"{name}: `{json.dumps(RECIPES[name])}`" for name in (GPTQ, INT8))}.
- Caveat (DATA.md): SmolLM2's fp32 weights were decoded from a Q4_1 g32 GGUF, so a g32 asymmetric grid would
  reproduce them; both Q4 GGUFs here are symmetric (Q4_0).
"""
    update_section(NAME, body)
    print(body)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

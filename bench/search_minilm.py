"""A search to a quality budget on all-MiniLM-L6-v2 (issue 18's "Done when"), run through the real service exactly
as bench.search_smollm2 runs the SmolLM2 one (the same driver; only the target differs):

- Constraint: embedding cosine >= 0.99 with the original's (mean-pooled, per row, averaged) on held-out review
  sentences (the first N of gensim's 200 labelled movie-review sentences, negative and positive alternating); the
  scan calibrates on the default corpus (Wikipedia), so the reviews are held out.
- Objective: min_size, at most 12 trials, one at a time.
- Target: <= 0.17x the fp32 weight bytes; baseline: the smallest hand-made recipe in docs/benchmarks.md at that
  size (mixed 4/8-bit g64 asymmetric at 5 bits on average, 0.169x, cosine 0.992 on the probe sentences:
  bench.quant_minilm).
- The space: rtn at 4, 5 or 6 bits, groups of 64 or 128, symmetric or not, the embedding table included (it is
  half of MiniLM's parameters), up to 30% of the parameters kept at 6 bits by the scan's ranking. A first run
  with 8-bit protection and 8-bit trials (wasted at this budget: 0.26x) came closest at 0.1705x (cosine 0.9916).

Quality numbers only, no timings. Run (creates the database if missing):
    MCS_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/mcs_bench_search \\
        MCS_BROKER_URL=redis://127.0.0.1:6379/4 .venv/bin/python -m bench.search_minilm --out /tmp/bench-search.md
Exits 1 when a check fails.
"""

import sys
from typing import Any

from bench.evaluation import alternating_reviews
from bench.search_smollm2 import Target, main
from core.compression.shipped import minilm_folder

REVIEWS = 100
MIN_COSINE = 0.99
SPACE = {"methods": ["rtn"], "bits": [4, 5, 6], "group_sizes": [64, 128], "symmetric": [True, False],
         "presets": [], "protect_bits": 6, "max_protect_share": 0.3, "include_head": True,
         "scan_calibration": {"num_samples": 8, "seq_len": 64}}


def review_rows(count: int) -> list[dict[str, Any]]:
    """The first `count` review sentences, balanced between negative and positive."""
    return [{"text": sentence} for sentence, _ in alternating_reviews()[:count]]


MINILM = Target(
    name="search_minilm",
    command=("MCS_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/mcs_bench_search "
             "MCS_BROKER_URL=redis://127.0.0.1:6379/4 .venv/bin/python -m bench.search_minilm"),
    title=f"Search to a quality budget: all-MiniLM-L6-v2, embedding cosine >= {MIN_COSINE}, smallest recipe",
    folder=minilm_folder, model_name="all-MiniLM-L6-v2", rows=review_rows, metric="embedding_cosine",
    constraint={"metric": "cosine", "min": MIN_COSINE}, constraint_text=f"cosine >= {MIN_COSINE}",
    evaluation_text="embedding cosine with the original on the first {rows} review sentences of "
                    "pang_lee_polarity.cor (held out)",
    space=SPACE, target=0.17,
    baseline=("mixed 4/8-bit g64 asymmetric, avg 5 bits (bench.quant_minilm)", 0.169))

if __name__ == "__main__":
    sys.exit(main(MINILM, REVIEWS, __doc__))

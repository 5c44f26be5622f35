"""Algorithms behind the prune, decompose and encode steps: masks and sparse storage, calibration, pruning,
low-rank factorization and Huffman coding. The step handlers in `core.compression.steps` call into these."""

"""Weight quantization algorithms shared by the quantize steps: integer grids, bit packing, k-means codebooks,
GPTQ, and the packed formats that artifacts store (each registered with its decoder)."""

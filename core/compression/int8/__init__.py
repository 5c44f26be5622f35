"""W8A8: int8 weights and int8 activations executed by real int8 CPU kernels (the dynamic, static and smoothquant
quantize steps), with the activation observers and the SmoothQuant scaling they use."""

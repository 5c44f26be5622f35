"""What the CPU's int8 units can do, as torch reports it: the W8A8 steps pick their activation width and kernel
from these."""

import torch


def cpu_has_vnni() -> bool:
    """AVX512-VNNI or AVX-VNNI: u8 x s8 dot products accumulate in int32 without saturating."""
    check = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(check()) if check is not None else False


def cpu_has_amx_int8() -> bool:
    """Intel AMX tiles for int8 (Sapphire Rapids and later): oneDNN's int8 GEMM runs on them."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check()) if check is not None else False

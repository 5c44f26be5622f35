"""The runtimes a job may name to have its speed verified on (`"runtimes": ["torch", "onnxruntime", "llama.cpp"]`),
what each needs, and which of them this process can run. Pure data and `importlib` look-ups, no torch: the API
validates a recipe with these, and a worker advertises `installed_runtimes()` in its capacity row.

    torch        always there (the worker's own runtime): the artifact as `load_compressed` loads it
    onnxruntime  package `onnxruntime`: the job's ONNX export (the KV-cache graph for a causal LM)
    llama.cpp    package `llama_cpp` (llama-cpp-python, the `llamacpp` extra): the job's GGUF export
"""

import importlib.util
from collections.abc import Sequence
from typing import Literal, get_args

from core.compression.configs.base import GGUF, ONNX, ExportFormat, StepConfig
from core.compression.export_rules import model_export_refusal

Runtime = Literal["torch", "onnxruntime", "llama.cpp"]
RUNTIMES: tuple[Runtime, ...] = get_args(Runtime)
TORCH: Runtime = "torch"
ONNXRUNTIME: Runtime = "onnxruntime"
LLAMA_CPP: Runtime = "llama.cpp"
# The Python module each optional runtime is imported as, and how an operator installs it.
MODULES: dict[Runtime, str] = {ONNXRUNTIME: "onnxruntime", LLAMA_CPP: "llama_cpp"}
INSTALL: dict[str, str] = {ONNXRUNTIME: "pip install onnxruntime",
                               LLAMA_CPP: "pip install '.[llamacpp]' (llama-cpp-python; builds from source)"}
# The export format a runtime runs the artifact from.
FORMATS: dict[Runtime, ExportFormat] = {ONNXRUNTIME: ONNX, LLAMA_CPP: GGUF}


def installed_runtimes() -> list[Runtime]:
    """The runtimes this process can run: torch, and each optional one whose package is importable. Found with
    `find_spec`, not imported: importing llama_cpp loads its shared library into the worker's main process, which
    only advertises it.
    Example: `installed_runtimes()` is `["torch", "onnxruntime"]` without llama-cpp-python."""
    return [runtime for runtime in RUNTIMES
            if runtime not in MODULES or importlib.util.find_spec(MODULES[runtime]) is not None]


def missing_runtimes(needed: Sequence[str], available: Sequence[str] | None) -> list[str]:
    """The runtimes of `needed` that a worker advertising `available` lacks (None: a worker from before runtimes
    were advertised, which runs torch only)."""
    have = set(available) if available is not None else {TORCH}
    return [runtime for runtime in needed if runtime not in have]


def check_runtimes(steps: Sequence[StepConfig], runtimes: Sequence[Runtime]) -> None:
    """Raise ValueError when a runtime's export format cannot represent a step (the runtime runs that export), or a
    runtime is named twice."""
    if len(set(runtimes)) != len(runtimes):
        raise ValueError(f"runtimes lists a runtime twice: {list(runtimes)}")
    for runtime in runtimes:
        fmt = FORMATS.get(runtime)
        if fmt is None:
            continue
        for index, step in enumerate(steps):
            if (reason := step.export_refusal(fmt)) is not None:
                raise ValueError(f'runtime "{runtime}" runs the {fmt} export, which cannot represent step {index} '
                                 f"({step.tag()}): {reason}")


def model_runtime_refusal(runtimes: Sequence[str], architecture: str) -> str | None:
    """Why a runtime in `runtimes` cannot run a model of class `architecture`, or None. llama.cpp runs our GGUF
    export, which writes Llama-family causal LMs only.
    Example: `model_runtime_refusal(["llama.cpp"], "BertModel")` names the architectures."""
    if LLAMA_CPP in runtimes and (reason := model_export_refusal([GGUF], architecture)):
        return f'runtime "llama.cpp" runs the GGUF export: {reason}'
    return None

"""Training checkpoints under the job's work dir, safetensors + JSON only (nothing is pickled).

`state-<step>.safetensors` holds the trainable parameters (`param/<name>`) and the AdamW moments
(`opt/<index>/<key>`); `state-<step>.json` the step, the losses so far and a fingerprint of the run (config and
trainable shapes). `latest.json` names the newest complete checkpoint and is replaced atomically, so a worker killed
mid-write resumes from the previous one.
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

LATEST = "latest.json"


@dataclass
class Progress:
    """Where a run stands: optimizer steps done and the training loss of each."""

    step: int = 0
    losses: list[float] = field(default_factory=list)


class Checkpoints:
    """Saves and restores one training run; a directory of None disables checkpointing."""

    def __init__(self, directory: Path | None, fingerprint: str) -> None:
        self.directory = directory
        self.fingerprint = fingerprint

    def save(self, progress: Progress, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        if self.directory is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = f"state-{progress.step:07d}"
        tensors = {f"param/{name}": p.detach().cpu().contiguous() for name, p in params.items()}
        tensors.update(_optimizer_tensors(optimizer, list(params.values())))
        save_file(tensors, self.directory / f"{stem}.safetensors")
        meta = {"step": progress.step, "losses": progress.losses, "fingerprint": self.fingerprint}
        _write_atomic(self.directory / f"{stem}.json", json.dumps(meta))
        _write_atomic(self.directory / LATEST, json.dumps({"stem": stem}))
        for old in self.directory.glob("state-*"):
            if not old.name.startswith(stem):
                old.unlink()

    def restore(self, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> Progress | None:
        """Load the newest checkpoint of this same run into `params` and `optimizer`; None if there is none."""
        meta = self._latest_meta()
        if meta is None:
            return None
        tensors = load_file(self.directory / f"{meta['stem']}.safetensors")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[f"param/{name}"].to(p.device))
        _load_optimizer(optimizer, list(params.values()), tensors)
        return Progress(step=meta["step"], losses=list(meta["losses"]))

    def _latest_meta(self) -> dict | None:
        if self.directory is None or not (self.directory / LATEST).is_file():
            return None
        stem = json.loads((self.directory / LATEST).read_text())["stem"]
        meta = json.loads((self.directory / f"{stem}.json").read_text())
        if meta.get("fingerprint") != self.fingerprint:  # another recipe or model: never mix runs
            return None
        return {**meta, "stem": stem}


def fingerprint(config_json: str, params: dict[str, nn.Parameter]) -> str:
    """Identifies a run: the step's config and the names and shapes of what trains."""
    shapes = [(name, list(p.shape)) for name, p in params.items()]
    return hashlib.sha256(json.dumps([config_json, shapes]).encode()).hexdigest()[:16]


def _optimizer_tensors(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, p in enumerate(params):
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"opt/{index}/{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors


def _load_optimizer(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], tensors: dict) -> None:
    for index, p in enumerate(params):
        prefix = f"opt/{index}/"
        state = {key.removeprefix(prefix): value for key, value in tensors.items() if key.startswith(prefix)}
        if state:
            # Plain AdamW keeps `step` as a CPU float tensor, fused AdamW on the parameter's device like the moments.
            step_device = p.device if optimizer.defaults.get("fused") else torch.device("cpu")
            optimizer.state[p] = {k: v.to(step_device if k == "step" else p.device) for k, v in state.items()}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)

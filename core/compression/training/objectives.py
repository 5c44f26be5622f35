"""What the student learns and how well it does: distillation losses against a frozen teacher, the next-token
task loss, and held-out evaluation (sentence-embedding cosine for encoders, perplexity for causal LMs)."""

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.compression.configs.training import DistillLoss

Inputs = dict[str, torch.Tensor]


def is_causal_lm(model: nn.Module) -> bool:
    """A model with a language-model head (its outputs have logits over the vocabulary)."""
    return hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None


def default_loss(model: nn.Module) -> DistillLoss:
    """Token distributions for causal LMs; hidden states for encoders (they have no logits to match)."""
    return DistillLoss(logits_kl=1.0) if is_causal_lm(model) else DistillLoss(hidden_mse=1.0)


@dataclass
class Distillation:
    """Student vs frozen teacher; `layer_map[i]` is the teacher layer that student layer i imitates."""

    teacher: nn.Module
    weights: DistillLoss
    temperature: float
    layer_map: list[int]

    def compare(self, student: nn.Module, inputs: Inputs) -> tuple[torch.Tensor, Any, Any]:
        """(weighted loss, teacher outputs, student outputs) on one batch; differentiable in the student."""
        flags = {"output_hidden_states": True, "output_attentions": self.weights.attention > 0}
        with torch.no_grad():
            teacher_out = self.teacher(**inputs, **flags)
        student_out = student(**inputs, **flags)
        mask = inputs["attention_mask"].bool()
        loss = torch.zeros((), device=mask.device)
        if self.weights.logits_kl:
            loss = loss + self.weights.logits_kl * logits_kl(teacher_out.logits, student_out.logits, mask,
                                                             self.temperature)
        if self.weights.hidden_mse:
            pairs = self._pairs(teacher_out.hidden_states, student_out.hidden_states, offset=1)
            pairs = pairs[-1:] if self.weights.hidden_layers == "last" else pairs
            loss = loss + self.weights.hidden_mse * hidden_mse(pairs, mask)
        if self.weights.embedding:
            cosines = F.cosine_similarity(pooled(teacher_out.hidden_states[-1], mask),
                                          pooled(student_out.hidden_states[-1], mask), dim=-1)
            loss = loss + self.weights.embedding * (1 - cosines).mean()
        if self.weights.attention:
            pairs = self._pairs(teacher_out.attentions, student_out.attentions, offset=0)
            loss = loss + self.weights.attention * attention_mse(pairs, mask)
        return loss, teacher_out, student_out

    def _pairs(self, teacher: tuple, student: tuple, offset: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # hidden_states[0] is the embedding output, so layer i is at i + 1; attentions start at layer 0.
        return [(teacher[t + offset], student[s + offset]) for s, t in enumerate(self.layer_map)]


def logits_kl(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions at real tokens, times T² (Hinton et al.)."""
    t = F.log_softmax(teacher[mask].float() / temperature, dim=-1)
    s = F.log_softmax(student[mask].float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def hidden_mse(pairs: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> torch.Tensor:
    """Relative squared error ‖s − t‖² / ‖t‖² at real tokens, averaged over the given layers; the last one (the
    model's output, when all are given) counts twice."""
    errors = [_relative_error(t[mask], s[mask]) for t, s in pairs]
    return (sum(errors) + errors[-1]) / (len(errors) + 1)


def attention_mse(pairs: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of attention probabilities, over the queries at real tokens."""
    errors = [F.mse_loss(s.transpose(1, 2)[mask], t.transpose(1, 2)[mask]) for t, s in pairs]
    return sum(errors) / len(errors)


def _relative_error(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return (student.float() - teacher.float()).pow(2).sum() / teacher.float().pow(2).sum().clamp(min=1e-12)


def task_loss(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM on the batch (padding ignored)."""
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return model(**inputs, labels=labels).loss


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, L2-normalised: the sentence embedding of MiniLM-style encoders."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1), dim=-1)


@torch.no_grad()
def evaluate(objective: Distillation, student: nn.Module, batches: list[Inputs]) -> dict[str, float]:
    """Held-out numbers: the distillation loss, and the embedding cosine (encoders) or perplexities (causal LMs)."""
    causal = is_causal_lm(student)
    losses, cosines, nll = [], [], {"student": 0.0, "teacher": 0.0, "tokens": 0}
    for inputs in batches:
        loss, teacher_out, student_out = objective.compare(student, inputs)
        losses.append(loss.item())
        if causal:
            _add_nll(nll, inputs, teacher_out.logits, student_out.logits)
        else:
            mask = inputs["attention_mask"]
            t, s = pooled(teacher_out.hidden_states[-1], mask), pooled(student_out.hidden_states[-1], mask)
            cosines += F.cosine_similarity(t, s, dim=-1).tolist()
    result = {"loss": sum(losses) / len(losses)}
    if causal:
        result["perplexity"] = math.exp(nll["student"] / max(1, nll["tokens"]))
        result["teacher_perplexity"] = math.exp(nll["teacher"] / max(1, nll["tokens"]))
    else:
        result["cosine"] = sum(cosines) / len(cosines)
    return result


def _add_nll(totals: dict, inputs: Inputs, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> None:
    labels = inputs["input_ids"][:, 1:].masked_fill(inputs["attention_mask"][:, 1:] == 0, -100)
    for key, logits in (("teacher", teacher_logits), ("student", student_logits)):
        totals[key] += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                       reduction="sum").item()
    totals["tokens"] += int((labels != -100).sum())

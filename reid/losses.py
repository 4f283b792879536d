"""The training loss as one list of weighted terms: the margin head, a head per level, the species head, a mined
triplet loss and distillation from a teacher, each a small function of the batch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .model import head_loss, l2n


@dataclass
class Batch:
    x: torch.Tensor  # the images the model saw (after mixing)
    emb: torch.Tensor  # (N, D) embeddings
    pooled: list[torch.Tensor]  # the pooled levels
    labels: torch.Tensor  # (N, 2): individual, species


@dataclass
class Term:
    name: str
    weight: float
    fn: Callable[[Batch, torch.Tensor], torch.Tensor]  # (batch, labels) -> loss
    mixed: bool  # follows the batch's mixing (mixup, CutMix, RICAP): averaged over the label parts


def loss_terms(cfg, model: nn.Module, head: nn.Module, level_heads: nn.Module | None = None,
               teacher: nn.Module | None = None, amp: Callable = contextlib.nullcontext) -> list[Term]:
    """The terms the config switches on, with their weights; `amp()` is the autocast the teacher runs under."""
    terms = [Term("margin", 1.0, lambda b, y: head_loss(head, b.emb, y[:, 0]), True)]
    if level_heads is not None:
        terms.append(Term("levels", cfg.loss.level_weight, lambda b, y: level_heads(b.pooled, y[:, 0]), True))
    if model.species_head is not None:
        terms.append(Term("species", cfg.loss.species_weight,
                          lambda b, y: F.cross_entropy(model.species_head(b.emb.float()), y[:, 1]), True))
    if cfg.loss.pair_weight:
        terms.append(Term("pairs", cfg.loss.pair_weight, pair_term(cfg.loss), False))
    if teacher is not None:
        t = cfg.train

        def distill(b: Batch, _y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), amp():
                target = teacher(b.x)
            return distill_loss(b.emb.float(), target.float(), t.distill_temperature)

        terms.append(Term("distill", t.distill_weight, distill, False))
    return terms


def total_loss(terms: list[Term], batch: Batch, parts: list) -> torch.Tensor:
    """The weighted sum of the terms; a mixed term is averaged over the parts [(partner permutation or None, label
    weight)] of the mixing, the others see the batch's own labels."""
    total = 0.0
    for term in terms:
        if term.mixed:
            value = sum(w * term.fn(batch, batch.labels if perm is None else batch.labels[perm]) for perm, w in parts)
        else:
            value = term.fn(batch, batch.labels)
        total = total + term.weight * value
    return total


class TrainingLoss(nn.Module):
    """The network, its margin heads and the loss terms as one module whose forward is a training step's loss: under
    torchrun, DistributedDataParallel wraps it and reduces the gradients of all it trains, class centres included."""

    def __init__(self, model: nn.Module, head: nn.Module, level_heads: nn.Module | None, terms: list[Term],
                 amp: Callable = contextlib.nullcontext):
        super().__init__()
        self.model, self.head, self.level_heads, self.terms, self.amp = model, head, level_heads, terms, amp

    def forward(self, x: torch.Tensor, labels: torch.Tensor, parts: list) -> torch.Tensor:
        with self.amp():
            pooled = self.model.levels(x)
            emb = self.model.embed(pooled)
        return total_loss(self.terms, Batch(x, emb, pooled, labels), parts)


def pair_term(cfg) -> Callable[[Batch, torch.Tensor], torch.Tensor]:
    """A triplet loss on the hard pairs a multi-similarity miner finds in the batch (pytorch-metric-learning)."""
    from pytorch_metric_learning import losses, miners

    miner, triplet = miners.MultiSimilarityMiner(epsilon=0.1), losses.TripletMarginLoss(margin=cfg.pair_margin)

    def pairs(b: Batch, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(b.emb.device.type, enabled=False):
            e = b.emb.float()
            return triplet(e, y[:, 0], miner(e, y[:, 0]))

    return pairs


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Relational embedding distillation: the student's softmax over in-batch cosine similarities follows the
    teacher's (KL divergence at a temperature). Works whatever the two embedding sizes."""
    eye = torch.eye(len(student), dtype=torch.bool, device=student.device)
    s, t = l2n(student), l2n(teacher)
    s_logits = (s @ s.T / temperature).masked_fill(eye, -1e4)
    t_logits = (t @ t.T / temperature).masked_fill(eye, -1e4)
    return F.kl_div(F.log_softmax(s_logits, 1), F.softmax(t_logits, 1), reduction="batchmean")

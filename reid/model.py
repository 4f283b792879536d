"""The embedding network (timm backbone, GeM per feature level, neck) and the ArcFace head."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class ModelError(ValueError):
    """A model that cannot be built as configured; the message says which key to change."""


class GeM(nn.Module):
    """Generalized mean pooling: (mean x^p)^(1/p), p learnable; p=1 is average, large p tends to max pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32: x^p overflows half precision for typical activations and p
        x = x.float().clamp(min=self.eps).pow(self.p)
        return x.mean(dim=(-2, -1)).pow(1.0 / self.p)


class AvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().mean(dim=(-2, -1))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("REID_OFFLINE", "0") != "0"


def create_backbone(cfg) -> nn.Module:
    """timm feature extractor at `cfg.out_indices`: random, from the hub (`pretrained`) or a local file (`weights`)."""
    import timm

    kwargs = {"features_only": True, "out_indices": tuple(cfg.out_indices), "drop_rate": cfg.drop_rate}
    if cfg.weights:
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise ModelError(f"model.weights: {path} does not exist")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    elif cfg.pretrained:
        if _offline():
            raise ModelError(_no_weights(cfg.backbone, "the hub is switched off (HF_HUB_OFFLINE)"))
        kwargs["pretrained"] = True
    try:
        return timm.create_model(cfg.backbone, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ModelError(f"model.backbone: timm has no model {cfg.backbone!r}") from err
        raise
    except (IndexError, AssertionError) as err:
        raise ModelError(f"model.out_indices {cfg.out_indices} do not fit {cfg.backbone}: {err}") from err
    except (OSError, ConnectionError) as err:
        if cfg.weights:
            raise ModelError(f"model.weights: cannot load {cfg.weights} into {cfg.backbone}: {err}") from err
        raise ModelError(_no_weights(cfg.backbone, str(err).splitlines()[0] if str(err) else type(err).__name__)) \
            from err


def _no_weights(name: str, why: str) -> str:
    return (f"cannot download pretrained weights for {name} ({why}). Offline, give a local weight file with "
            f"model.weights=/path/to/{name}.safetensors, or train from scratch with model.pretrained=false")


class ReidNet(nn.Module):
    """Backbone -> GeM on each chosen feature level -> concatenation -> Linear + BatchNorm1d -> embedding."""

    def __init__(self, cfg, n_species: int = 0):
        super().__init__()
        self.backbone = create_backbone(cfg)
        channels = self.backbone.feature_info.channels()
        pool = (lambda: GeM(cfg.gem_p)) if cfg.pooling == "gem" else AvgPool
        self.pools = nn.ModuleList(pool() for _ in channels)
        self.neck = nn.Sequential(nn.Dropout(cfg.drop_rate), nn.Linear(sum(channels), cfg.embedding_dim),
                                  nn.BatchNorm1d(cfg.embedding_dim))
        self.neck[2].bias.requires_grad_(False)  # BNNeck: a shared offset would pull every embedding one way
        self.species_head = nn.Linear(cfg.embedding_dim, n_species) if n_species else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        pooled = torch.cat([pool(f) for pool, f in zip(self.pools, features, strict=True)], dim=1)
        return self.neck(pooled.to(self.neck[1].weight.dtype))


def build_head(cfg, num_classes: int, embedding_dim: int) -> nn.Module:
    """ArcFace or sub-center ArcFace from pytorch-metric-learning. The config's margin is in radians (as in the
    paper and the seeds' m=0.3); the library takes degrees."""
    from pytorch_metric_learning import losses

    margin = math.degrees(cfg.margin)
    if cfg.head == "subcenter":
        head = losses.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=embedding_dim, margin=margin,
                                           scale=cfg.scale, sub_centers=cfg.sub_centers)
    else:
        head = losses.ArcFaceLoss(num_classes, embedding_dim, margin=margin, scale=cfg.scale)
    if cfg.label_smoothing:
        head.cross_entropy = nn.CrossEntropyLoss(reduction="none", label_smoothing=cfg.label_smoothing)
    return head


def head_loss(head: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The margin loss in fp32 whatever the autocast state: the library casts its weights to the input dtype."""
    with torch.autocast(embeddings.device.type, enabled=False):
        return head(embeddings.float(), labels)


def param_groups(model: nn.Module, head: nn.Module, lr: float, weight_decay: float, head_lr_mult: float) -> list:
    """No weight decay on biases, norm layers and GeM's p (all 1-d); the class centres get their own rate."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"params": list(head.parameters()), "lr": lr * head_lr_mult, "weight_decay": weight_decay},
    ]


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str):
    """Linear warmup, then cosine to zero or steps of x0.1 at 60 % and 85 % of training."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        done = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "step":
            return 0.1 ** ((done >= 0.6) + (done >= 0.85))
        return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))

    return factor


def l2n(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=1)

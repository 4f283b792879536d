"""The embedding network (timm backbone, GeM per feature level, neck) and the ArcFace head."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ReidError


class ModelError(ReidError):
    """A model that cannot be built as configured; the message says which key to change."""


def stripe_mean(x: torch.Tensor, stripes: int) -> torch.Tensor:
    """Mean over each of `stripes` horizontal bands of the map, flattened to (N, C * stripes)."""
    if stripes == 1:
        return x.mean(dim=(-2, -1))
    # horizontal bands keep the top-to-bottom layout and stay the same under a left-right flip
    if torch.onnx.is_in_onnx_export():  # the exporter cannot size adaptive pooling after dynamic "same" padding
        h = int(x.shape[-2])  # a constant: an exported model has one input size
        bands = [x[:, :, (i * h) // stripes: -((-(i + 1) * h) // stripes)].mean(dim=(-2, -1)) for i in range(stripes)]
        return torch.stack(bands, dim=2).flatten(1)  # channel-major, as adaptive_avg_pool2d flattens
    return F.adaptive_avg_pool2d(x, (stripes, 1)).flatten(1)


class GeM(nn.Module):
    """Generalized mean pooling: (mean x^p)^(1/p), p learnable; p=1 is average, large p tends to max pooling.
    With `stripes` > 1, one GeM per horizontal band (the part pooling of PCB re-identification)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True, stripes: int = 1):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)), requires_grad=learnable)
        self.eps, self.stripes = eps, stripes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32: x^p overflows half precision for typical activations and p
        x = x.float().clamp(min=self.eps).pow(self.p)
        return stripe_mean(x, self.stripes).pow(1.0 / self.p)


class AvgPool(nn.Module):
    def __init__(self, stripes: int = 1):
        super().__init__()
        self.stripes = stripes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stripe_mean(x.float(), self.stripes)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("REID_OFFLINE", "0") != "0"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the weights hub answers within `timeout` seconds: offline, its client retries for most of a minute
    before failing, so ask once, fast."""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def create_backbone(cfg) -> nn.Module:
    """timm feature extractor at `cfg.out_indices`: random, from the hub (`pretrained`), or from a weight file or an
    installed package (`weights`, timm or a foreign layout: reid.weights)."""
    import timm

    from .weights import load_into, packaged_backbone

    kwargs = {"features_only": True, "out_indices": tuple(cfg.out_indices), "drop_rate": cfg.drop_rate,
              "drop_path_rate": cfg.drop_path_rate}
    fits = packaged_backbone(cfg.weights) if cfg.weights else None
    if fits and cfg.backbone.split(".")[0] != fits:
        raise ModelError(f"model.weights={cfg.weights} holds {fits}; set model.backbone={fits}")
    if cfg.pretrained and not cfg.weights:
        if _offline():
            raise ModelError(_no_weights(cfg.backbone, "the hub is switched off (HF_HUB_OFFLINE)"))
        if not hub_reachable():
            raise ModelError(_no_weights(cfg.backbone, "the hub cannot be reached"))
        kwargs["pretrained"] = True
    try:
        backbone = timm.create_model(cfg.backbone, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ModelError(f"model.backbone: timm has no model {cfg.backbone!r}") from err
        raise
    except (IndexError, AssertionError) as err:
        raise ModelError(f"model.out_indices {cfg.out_indices} do not fit {cfg.backbone}: {err}") from err
    except (OSError, ConnectionError) as err:
        raise ModelError(_no_weights(cfg.backbone, str(err).splitlines()[0] if str(err) else type(err).__name__)) \
            from err
    if cfg.weights:
        load_into(backbone, cfg.weights)
    return backbone


def input_stats(cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean and std (0-1 scale): `data.mean` / `data.std` when set, else the backbone's pretrained config
    in timm (0.5 / 0.5 for `tf_efficientnet_lite*`, ImageNet's for most others), which its weights were trained on."""
    if cfg.data.mean and cfg.data.std:
        return tuple(cfg.data.mean), tuple(cfg.data.std)
    import timm

    try:
        pcfg = timm.get_pretrained_cfg(cfg.model.backbone)
    except (RuntimeError, ValueError):
        pcfg = None
    mean = getattr(pcfg, "mean", None) or (0.485, 0.456, 0.406)
    std = getattr(pcfg, "std", None) or (0.229, 0.224, 0.225)
    return tuple(cfg.data.mean or mean), tuple(cfg.data.std or std)


def _no_weights(name: str, why: str) -> str:
    return (f"cannot download pretrained weights for {name} ({why}). Offline, give a local weight file with "
            f"model.weights=/path/to/{name}.safetensors, or train from scratch with model.pretrained=false")


class ReidNet(nn.Module):
    """Backbone -> GeM on each chosen feature level -> concatenation -> Linear + BatchNorm1d -> embedding."""

    def __init__(self, cfg, n_species: int = 0):
        super().__init__()
        self.backbone = create_backbone(cfg)
        channels = [c * cfg.stripes for c in self.backbone.feature_info.channels()]
        pool = (lambda: GeM(cfg.gem_p, stripes=cfg.stripes)) if cfg.pooling == "gem" else (lambda: AvgPool(cfg.stripes))
        self.pools = nn.ModuleList(pool() for _ in channels)
        self.neck = nn.Sequential(nn.Dropout(cfg.drop_rate), nn.Linear(sum(channels), cfg.embedding_dim),
                                  nn.BatchNorm1d(cfg.embedding_dim))
        self.neck[2].bias.requires_grad_(False)  # BNNeck: a shared offset would pull every embedding one way
        self.species_head = nn.Linear(cfg.embedding_dim, n_species) if n_species else None
        self.level_channels = channels

    def levels(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The pooled features of each chosen level, (N, channels * stripes) each."""
        return [pool(f) for pool, f in zip(self.pools, self.backbone(x), strict=True)]

    def embed(self, pooled: list[torch.Tensor]) -> torch.Tensor:
        """The embedding of the pooled levels."""
        return self.neck(torch.cat(pooled, dim=1).to(self.neck[1].weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.levels(x))


class LevelHeads(nn.Module):
    """Deep supervision: an ArcFace head on each pooled level alone, through a neck of its own, so that the loss
    reaches the shallow levels directly. Training only: the embedding and the search don't use it."""

    def __init__(self, level_channels: list[int], cfg, num_classes: int, embedding_dim: int, class_counts=None):
        super().__init__()
        self.necks = nn.ModuleList(nn.Sequential(nn.Linear(c, embedding_dim), nn.BatchNorm1d(embedding_dim))
                                   for c in level_channels)
        self.heads = nn.ModuleList(build_head(cfg, num_classes, embedding_dim, class_counts) for _ in level_channels)

    def forward(self, pooled: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The mean of the levels' margin losses."""
        levels = zip(self.necks, self.heads, pooled, strict=True)
        return torch.stack([head_loss(head, neck(p.float()), labels) for neck, head, p in levels]).mean()


class ClassMargin:
    """Mixin for pytorch-metric-learning's ArcFace losses: a margin per class (radians) instead of one."""

    def set_class_margins(self, margins: torch.Tensor) -> None:
        self.register_buffer("class_margins", margins.float())

    def compute_loss(self, embeddings, labels, *args):
        self._batch_margin = self.class_margins.to(embeddings.device)[labels]
        return super().compute_loss(embeddings, labels, *args)

    def modify_cosine_of_target_classes(self, cosine: torch.Tensor) -> torch.Tensor:
        m, angles = self._batch_margin, self.get_angles(cosine)
        return torch.where(angles <= math.pi - m, torch.cos(angles + m), torch.cos(angles) - m * torch.sin(m))


def class_margins(counts, base: float, rare: float) -> torch.Tensor:
    """Margins that grow for individuals with few photos: base + rare * count^-1/4 (the dynamic margin of the
    Google Landmark 2020 winners)."""
    return base + rare * torch.tensor(np.asarray(counts), dtype=torch.float32).clamp(min=1) ** -0.25


def build_head(cfg, num_classes: int, embedding_dim: int, class_counts=None) -> nn.Module:
    """ArcFace or sub-center ArcFace from pytorch-metric-learning. The config's margin is in radians (as in the
    paper and the seeds' m=0.3); the library takes degrees."""
    from pytorch_metric_learning import losses

    margin = math.degrees(cfg.margin)
    base = losses.SubCenterArcFaceLoss if cfg.head == "subcenter" else losses.ArcFaceLoss
    kwargs = {"sub_centers": cfg.sub_centers} if cfg.head == "subcenter" else {}
    if cfg.margin_rare and class_counts is not None:
        base = type(f"ClassMargin{base.__name__}", (ClassMargin, base), {})
    head = base(num_classes=num_classes, embedding_size=embedding_dim, margin=margin, scale=cfg.scale, **kwargs)
    if isinstance(head, ClassMargin):
        head.set_class_margins(class_margins(class_counts, cfg.margin, cfg.margin_rare))
    if cfg.label_smoothing:
        head.cross_entropy = nn.CrossEntropyLoss(reduction="none", label_smoothing=cfg.label_smoothing)
    return head


def class_centres(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's class centres, L2-normalized, (classes * sub-centres, D), and the class of each row."""
    w = torch.nn.functional.normalize(head.W.detach().float().t(), dim=1).cpu()
    return w, torch.arange(head.num_classes).repeat_interleave(w.shape[0] // head.num_classes)


def zero_init_last(model: nn.Module) -> int:
    """Zero the scale of the last norm layer in every residual block, so each block starts as an identity
    ("Bag of Tricks"). Returns how many blocks were changed."""
    changed = 0
    for block in model.modules():
        if getattr(block, "has_skip", False):
            norms = [m for m in block.children() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            if norms and norms[-1].weight is not None:
                nn.init.zeros_(norms[-1].weight)
                changed += 1
    return changed


def head_loss(head: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The margin loss in fp32 whatever the autocast state: the library casts its weights to the input dtype."""
    with torch.autocast(embeddings.device.type, enabled=False):
        return head(embeddings.float(), labels)


def freeze_norm_stats(module: nn.Module) -> int:
    """Put every BatchNorm of `module` in eval mode, so its running statistics stay as pretrained (the affine scale
    and shift still learn). Called after each `train()`. Returns how many were frozen."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.eval()
    return len(norms)


def l2n(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=1)

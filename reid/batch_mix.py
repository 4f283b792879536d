"""Batch-level augmentation: the side a batch is resized to (multi-scale training) and the mixing of
photos (mixup, CutMix, RICAP) with the label weights the margin head needs."""

from __future__ import annotations

import torch


def mix_batch(x: torch.Tensor, aug, gen: torch.Generator) -> tuple[torch.Tensor, list]:
    """Mixup, CutMix or RICAP on the batch, one drawn per batch among those switched on. Returns the images and
    [(partner permutation or None for the photo's own label, label weight), ...]."""
    kinds = [k for k in ("mixup", "cutmix", "ricap") if getattr(aug, k)]
    if not kinds:
        return x, [(None, 1.0)]
    kind = kinds[int(torch.randint(len(kinds), (1,), generator=gen))]
    alpha = getattr(aug, kind)
    beta = torch.distributions.Beta(alpha, alpha)
    lam = float(beta.sample())
    perm = torch.randperm(len(x), generator=gen).to(x.device)
    if kind == "mixup":
        return lam * x + (1 - lam) * x[perm], [(None, lam), (perm, 1 - lam)]
    if kind == "cutmix":
        return cutmix(x, perm, lam, gen)
    return ricap(x, float(beta.sample()), lam, gen)


def batch_side(aug, image_size: int, gen: torch.Generator) -> int:
    """The side a training batch is resized to: multi-scale training draws one of `aug.multiscale` x image_size per
    batch (a multiple of 32); otherwise image_size."""
    if not aug.multiscale:
        return image_size
    scale = aug.multiscale[int(torch.randint(len(aug.multiscale), (1,), generator=gen))]
    return max(32, int(round(image_size * scale / 32)) * 32)


def cutmix(x: torch.Tensor, perm: torch.Tensor, lam: float, gen: torch.Generator) -> tuple[torch.Tensor, list]:
    """A box of a partner photo pasted in; labels weighted by the areas."""
    h, w = x.shape[-2:]
    ch, cw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy, cx = int(torch.randint(h, (1,), generator=gen)), int(torch.randint(w, (1,), generator=gen))
    y1, y2, x1, x2 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., y1:y2, x1:x2] = x[perm][..., y1:y2, x1:x2]
    area = (y2 - y1) * (x2 - x1) / (h * w)
    return x, [(None, 1 - area), (perm, area)]


def ricap(x: torch.Tensor, bw: float, bh: float, gen: torch.Generator) -> tuple[torch.Tensor, list]:
    """RICAP: four photos' random crops tiled into one; labels weighted by the tiles' areas."""
    h, w = x.shape[-2:]
    cw, ch = max(1, min(w - 1, int(round(w * bw)))), max(1, min(h - 1, int(round(h * bh))))
    tiles = [(0, 0, ch, cw), (0, cw, ch, w - cw), (ch, 0, h - ch, cw), (ch, cw, h - ch, w - cw)]
    out, parts = torch.empty_like(x), []
    for k, (ty, tx, th, tw) in enumerate(tiles):
        perm = torch.randperm(len(x), generator=gen).to(x.device) if k else None
        src = x if perm is None else x[perm]
        sy = int(torch.randint(h - th + 1, (1,), generator=gen))
        sx = int(torch.randint(w - tw + 1, (1,), generator=gen))
        out[..., ty: ty + th, tx: tx + tw] = src[..., sy: sy + th, sx: sx + tw]
        parts.append((perm, th * tw / (h * w)))
    return out, parts

"""Turning photos into normalized embeddings: datasets from the config, loaders, flip, five-crop and multi-size TTA."""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from .config import ConfigError
from .data import PhotoDataset, build_transform, collate
from .model import input_stats

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA GPU is visible; use train.device=auto or cpu")
    return torch.device(name)


def amp_dtype(cfg, device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it (no loss scaling needed), else fp16; None on CPU or with amp off."""
    if device.type != "cuda" or not cfg.train.amp:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def photo_dataset(df: pd.DataFrame, cfg, boxes: list[dict], train: bool, labels=None, cache=None,
                  on_error: str = "raise") -> PhotoDataset:
    d = cfg.data
    labels = labels if labels is not None else np.zeros(len(df), int)
    transform = build_transform(cfg.aug, train, *input_stats(cfg))
    return PhotoDataset(df.path.tolist(), list(labels), boxes, df.image.tolist(), d.image_size, transform,
                        d.crop_margin, d.crop_jitter if train else 0.0, d.crop_probs or None, cache, on_error)


def ignore_sigint(_worker: int) -> None:
    """Workers leave Ctrl-C to the main process, which says what was saved; else each prints its own traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(dataset, cfg, device: torch.device, batch_size: int, sampler=None, drop_last: bool = False
                ) -> DataLoader:
    """DataLoader with workers, pinned memory and persistent workers from the config (pinning only on GPU)."""
    workers = cfg.data.num_workers
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, collate_fn=collate,
                      num_workers=workers, pin_memory=cfg.data.pin_memory and device.type == "cuda",
                      persistent_workers=cfg.data.persistent_workers and workers > 0,
                      prefetch_factor=4 if workers > 0 else None, worker_init_fn=ignore_sigint if workers else None)


def memory_format(cfg) -> torch.memory_format:
    """Channels-last unless switched off: faster convolutions with cuDNN on GPU and with oneDNN on CPU (`make bench`,
    layout, measures by how much). Model and batches must agree."""
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


def resize_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The batch at `size` (height, width): bilinear, antialiased when shrinking; unchanged at its own size."""
    side = tuple(int(s) for s in x.shape[-2:])  # ints under an ONNX export's tracing too, where the sides are fixed
    if side == tuple(size):
        return x
    return torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                           antialias=size[-1] < side[-1])


def resize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The batch at `scale` times its side (at least 8 pixels)."""
    if scale == 1.0:
        return x
    return resize_to(x, (max(8, round(x.shape[-2] * scale)), max(8, round(x.shape[-1] * scale))))


CROP = 0.875  # five-crop TTA: each crop's side as a share of the photo's


def views(x: torch.Tensor, five_crop: bool) -> torch.Tensor:
    """The batch, and with five-crop TTA its four corner crops and its centre crop (CROP of each side, resized back
    to the batch's size) folded into one batch of 6 N photos: one forward pass for all of them."""
    if not five_crop:
        return x
    h, w = (int(s) for s in x.shape[-2:])
    ch, cw = round(h * CROP), round(w * CROP)
    y, z = (h - ch) // 2, (w - cw) // 2
    crops = [x[..., :ch, :cw], x[..., :ch, w - cw:], x[..., h - ch:, :cw], x[..., h - ch:, w - cw:],
             x[..., y: y + ch, z: z + cw]]
    return torch.cat([x, *(resize_to(c, (h, w)) for c in crops)])


def embed_batch(model: torch.nn.Module, x: torch.Tensor, flip_tta: bool = True, scales=(1.0,),
                layout: torch.memory_format = torch.contiguous_format, five_crop: bool = False) -> torch.Tensor:
    """L2-normalized mean of the normalized embeddings of the batch at each scale, of its five crops with five-crop
    TTA, and of the mirrors of all of them with flip TTA (ten crops with both)."""
    e = 0.0
    for scale in scales or (1.0,):
        xs = views(resize(x, scale), five_crop).contiguous(memory_format=layout)
        for v in (xs, torch.flip(xs, dims=[3])) if flip_tta else (xs,):
            out = torch.nn.functional.normalize(model(v).float(), dim=1)
            e = e + sum(out.chunk(6 if five_crop else 1))  # by view: no batch size is fixed in an ONNX export
    return torch.nn.functional.normalize(e, dim=1)


@torch.no_grad()
def embed(model: torch.nn.Module, loader: DataLoader, device: torch.device, flip_tta: bool = True,
          dtype: torch.dtype | None = None, desc: str = "embed",
          layout: torch.memory_format = torch.contiguous_format, scales=(1.0,), five_crop: bool = False
          ) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) float32, L2-normalized: the mean over `scales` (multi-size TTA) of the photo's embedding, with flip
    TTA averaged with its mirror's, with five-crop TTA with its crops'; and an (N,) mask of the readable photos."""
    from .progress import progress_bar

    model.eval()
    out, ok = [], []
    for batch in progress_bar(loader, desc=desc, unit="batch", leave=False):
        x = batch["images"].to(device, non_blocking=True)
        with autocast(device, dtype):
            out.append(embed_batch(model, x, flip_tta, scales, layout, five_crop).cpu())
        ok.append(batch["indices"] >= 0)
    if not out:
        return np.zeros((0, 0), np.float32), np.zeros(0, bool)
    return torch.cat(out).numpy().astype(np.float32), torch.cat(ok).numpy()


def embed_frame(model, df: pd.DataFrame, cfg, boxes: list[dict], device: torch.device, cache=None,
                desc: str = "embed", on_error: str = "raise") -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and readable-mask of the photos of `df` (evaluation transform, no jitter)."""
    dataset = photo_dataset(df, cfg, boxes, False, cache=cache, on_error=on_error)
    loader = make_loader(dataset, cfg, device, cfg.predict.batch_size)
    return embed(model, loader, device, cfg.predict.flip_tta, amp_dtype(cfg, device), desc, memory_format(cfg),
                 cfg.predict.tta_scales, cfg.predict.five_crop)

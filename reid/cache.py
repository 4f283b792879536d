"""A cache of decoded, cropped, resized photos, written once in parallel by `reid prepare` and read by train
and predict. Each entry's name carries a hash of the source file (size, mtime), its box, the margin and the
size, so a changed photo, box or setting gets a new entry and nothing else is rebuilt."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import cv2
import numpy as np

from .data import BadImage, load_photo

log = logging.getLogger(__name__)


class PhotoCache:
    """Entries hold the box grown by the largest training margin (margin + jitter); a smaller margin is a centre
    crop of it, so margin jitter still works from the cache."""

    def __init__(self, folder: str | Path, size: int, margin: float, jitter: float = 0.0):
        self.folder, self.size = Path(folder), size
        self.outer = margin + jitter  # margin stored around the box
        inner = max(0.0, margin - jitter)
        self.stored = int(np.ceil(size * (1 + 2 * self.outer) / (1 + 2 * inner)))  # enough pixels after a crop

    def entry(self, path: str | Path, box) -> Path:
        st = Path(path).stat()
        spec = f"{Path(path).name}|{st.st_size}|{st.st_mtime_ns}|{box}|{self.outer:.4f}|{self.stored}"
        digest = hashlib.sha1(spec.encode()).hexdigest()[:16]
        return self.folder / digest[:2] / f"{Path(path).stem}-{digest}.jpg"

    def build(self, path: str | Path, box) -> Path:
        """Decode, crop and resize one photo into its entry (atomically); skip if it is already there."""
        out = self.entry(path, box)
        if out.is_file():
            return out
        size = self.stored if box is not None else self.size
        img, used = load_photo(path, size, box, self.outer)
        if box is not None and not used:  # degenerate box: store the whole photo at the final size
            img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{np.random.randint(1 << 30)}.tmp")
        ok, data = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        tmp.write_bytes(data.tobytes())
        tmp.replace(out)
        return out

    def load(self, path: str | Path, name: str, which: int, margin: float, box) -> np.ndarray:
        """The photo at `margin` (<= the stored one) and the final size, building the entry if it is missing."""
        out = self.entry(path, box)
        img = cv2.imread(str(out), cv2.IMREAD_COLOR) if out.is_file() else None
        if img is None:
            img = cv2.imread(str(self.build(path, box)), cv2.IMREAD_COLOR)
        img = img[..., ::-1]
        if box is not None and img.shape[0] != self.size:
            keep = (1 + 2 * max(0.0, min(margin, self.outer))) / (1 + 2 * self.outer)
            h, w = img.shape[:2]
            ch, cw = max(1, int(round(h * keep))), max(1, int(round(w * keep)))
            y, x = (h - ch) // 2, (w - cw) // 2
            img = img[y: y + ch, x: x + cw]
        return np.ascontiguousarray(cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA))


def _build_many(cache: PhotoCache, jobs: list[tuple[str, object]]) -> list[str]:
    """Build a chunk of entries; returns the errors (one line each) instead of raising."""
    errors = []
    for path, box in jobs:
        try:
            cache.build(path, box)
        except BadImage as err:
            errors.append(str(err))
    return errors


def prepare(cache: PhotoCache, items: list[tuple[str, object]], n_jobs: int = -1, chunk: int = 64) -> dict:
    """Build every (path, box) entry in parallel with a progress bar, then delete entries nothing refers to.
    Interrupted runs resume: finished entries are skipped."""
    from joblib import Parallel, delayed

    from .progress import progress_bar

    wanted = {cache.entry(p, b) for p, b in items}
    todo = [(p, b) for p, b in items if not cache.entry(p, b).is_file()]
    chunks = [todo[i: i + chunk] for i in range(0, len(todo), chunk)]
    errors: list[str] = []
    runner = Parallel(n_jobs=n_jobs, return_as="generator_unordered")
    with progress_bar(total=len(todo), desc="prepare", unit="photo") as bar:
        for part, errs in zip(chunks, runner(delayed(_build_many)(cache, c) for c in chunks), strict=False):
            errors += errs
            bar.update(len(part))
    stale = [f for f in cache.folder.glob("*/*.jpg") if f not in wanted] if cache.folder.is_dir() else []
    for f in stale:
        f.unlink()
    for err in errors[:10]:
        log.warning("prepare: %s", err)
    return {"entries": len(wanted), "built": len(todo) - len(errors), "reused": len(items) - len(todo),
            "removed_stale": len(stale), "failed": len(errors)}


def from_config(cfg) -> PhotoCache | None:
    """The cache the config asks for (data.cache), in data.cache_dir or ROOT/.reid_cache."""
    if not cfg.data.cache:
        return None
    folder = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.data.root) / ".reid_cache"
    return PhotoCache(folder / f"{cfg.data.image_size}px", cfg.data.image_size, cfg.data.crop_margin,
                      cfg.data.crop_jitter)


def items_for(paths: list[str], names: list[str], boxes: list[dict]) -> list[tuple[str, object]]:
    """Every (photo, box) pair train or predict may ask for: one per box file, or the whole photo."""
    if not boxes:
        return [(p, None) for p in paths]
    return [(p, b.get(n)) for b in boxes for p, n in zip(paths, names, strict=True)]

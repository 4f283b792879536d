r"""A held-out set for checking the recipe: photo-ID data from a generator that shares no code with `reid synth`.

`reid synth` draws fins and flukes told apart by their outline, notches and a few marks, on a sea, with a box file.
This draws spotted seals, whale sharks and zebras told apart by their coat pattern (each body side its own), on rock,
water and grass; bodies bend, turn up to 30 degrees, fill or overflow the frame; dappled light, occluders, motion blur,
strong white-balance shifts; no box file. Nothing is tuned on it: it checks choices made on `reid synth`
(docs/heldout.md).

    python scripts/heldout.py data/heldout [--individuals 300] [--seed 0]
    python scripts/ablate.py --minutes 6 --seeds 0 1 2 --data data/heldout --results DIR \
        --only default "plain:" "SGD with"
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

W, H = 256, 128  # canonical coat canvas: the body seen from one side
# species -> (abundance, coat colour BGR, pattern, background)
SPECIES = {
    "spotted_seal": (0.4, (120, 130, 140), "rings", "rocks"),
    "whale_shark": (0.3, (110, 85, 55), "dots", "water"),
    "plains_zebra": (0.3, (225, 230, 235), "stripes", "grass"),
}


def _rng(*parts) -> np.random.Generator:
    return np.random.default_rng(int(hashlib.sha1("-".join(map(str, parts)).encode()).hexdigest()[:15], 16))


def _smooth(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency noise, one value per `cell` pixels, upsampled."""
    small = rng.normal(0, 1, (max(2, h // cell), max(2, w // cell)))
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def coat(seed: int, index: int, side: int, species: str) -> np.ndarray:
    """One side of one individual's coat (BGR float, H x W): the identity."""
    rng = _rng(seed, "coat", index, side)
    _, colour, pattern, _ = SPECIES[species]
    base = np.array(colour) * _rng(seed, "tone", index).uniform(0.8, 1.15, 3)
    img = np.ones((H, W, 3)) * base + _smooth(rng, H, W, 32)[..., None] * 12
    dark = np.clip(base * 0.25, 0, 255)
    if pattern == "stripes":
        warp = _smooth(rng, H, W, 24) * rng.uniform(1.5, 3.5)
        phase = 2 * np.pi * np.linspace(0, 1, W)[None, :] * rng.uniform(9, 15) + warp
        stripes = np.sin(phase + np.linspace(0, rng.uniform(-2, 2), H)[:, None])
        img[stripes > rng.uniform(-0.1, 0.3)] = dark
        return img
    for _ in range(int(rng.integers(35, 70))):
        centre = (int(rng.uniform(0, W)), int(rng.uniform(0, H)))
        axes = (int(rng.uniform(2, 8)), int(rng.uniform(2, 8)))
        ink = (235, 235, 235) if pattern == "dots" else tuple(dark)
        thickness = 2 if pattern == "rings" and rng.random() < 0.6 else -1
        cv2.ellipse(img, centre, axes, rng.uniform(0, 180), 0, 360, ink, thickness, cv2.LINE_AA)
    return img


def body_mask(seed: int, index: int) -> np.ndarray:
    """The body's silhouette on the canvas, a tapering superellipse of the individual's proportions."""
    rng = _rng(seed, "shape", index)
    y, x = np.mgrid[0:H, 0:W]
    taper = 1 - rng.uniform(0.2, 0.5) * (x / W)
    e = rng.uniform(2.0, 3.5)
    return ((np.abs(x / (W / 2) - 1) ** e + np.abs((y - H / 2) / (H / 2 * taper)) ** e) < 1).astype(np.float32)


def background(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    if kind == "water":
        depth = np.linspace(0, 1, h)[:, None, None]
        caustics = np.abs(np.sin(_smooth(rng, h, w, 12) * 6))[..., None] > 0.9
        return np.array([150, 110, 40]) * (1.1 - 0.5 * depth) + _smooth(rng, h, w, 16)[..., None] * 10 + caustics * 40
    if kind == "grass":
        blades = cv2.resize(rng.normal(0, 1, (h // 2, w)), (w, h), interpolation=cv2.INTER_LINEAR)
        return np.array([40, 120, 90]) * rng.uniform(0.7, 1.2) + blades[..., None] * 25 + \
            _smooth(rng, h, w, 40)[..., None] * 20
    rock = _smooth(rng, h, w, 30)[..., None] * 30 + rng.normal(0, 12, (h, w, 1))
    return np.array([100, 110, 115]) * rng.uniform(0.7, 1.2) + rock


def _bend(rng: np.random.Generator, tex: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The body arches and its skin shifts: a smooth non-rigid warp of coat and silhouette."""
    mx, my = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    arch = rng.uniform(-0.25, 0.25) * H * np.linspace(-1, 1, W)[None, :] ** 2
    mx = (mx + _smooth(rng, H, W, 64) * rng.uniform(0, 6)).astype(np.float32)
    my = (my + _smooth(rng, H, W, 64) * rng.uniform(0, 6) + arch).astype(np.float32)
    return (cv2.remap(tex.astype(np.float32), mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT),
            cv2.remap(mask, mx, my, cv2.INTER_LINEAR, borderValue=0))


def _placement(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Canvas -> photo: often larger than the frame, turned up to 30 degrees, one end nearer the camera."""
    size = rng.uniform(0.5, 1.1) * w
    corners = np.float32([[-1, -0.5], [1, -0.5], [1, 0.5], [-1, 0.5]]) * size / 2
    corners[:, 1] *= 1 + rng.uniform(-0.25, 0.25) * np.float32([-1, 1, 1, -1])
    a = np.deg2rad(rng.uniform(-30, 30))
    turn = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]], np.float32)
    dst = corners @ turn + [rng.uniform(0.3, 0.7) * w, rng.uniform(0.35, 0.65) * h] + rng.normal(0, 0.04 * size, (4, 2))
    return cv2.getPerspectiveTransform(np.float32([[0, 0], [W, 0], [W, H], [0, H]]), dst.astype(np.float32))


def _motion_blur(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    k = int(rng.integers(3, 9))
    line = np.zeros((k, k), np.float32)
    line[k // 2] = 1 / k
    turn = cv2.getRotationMatrix2D((k / 2, k / 2), rng.uniform(0, 180), 1)
    return cv2.filter2D(img, -1, cv2.warpAffine(line, turn, (k, k)))


def render(seed: int, index: int, species: str, key: str) -> np.ndarray:
    """One field photo (BGR uint8) of individual `index`; `key` (the file name) seeds everything else."""
    rng = _rng(seed, "photo", key)
    side = int(rng.integers(2))
    tex, mask = coat(seed, index, side, species), body_mask(seed, index)
    if side:  # seen from the other side, the animal faces the other way
        tex, mask = tex[:, ::-1], mask[:, ::-1]
    tex, mask = _bend(rng, tex, mask)
    tex = tex * np.linspace(1.15, 0.75, H)[:, None, None]  # lit from above
    w = int(rng.integers(320, 641))
    h = int(w * rng.uniform(0.6, 0.8))
    m = _placement(rng, w, h)
    alpha = cv2.warpPerspective(mask, m, (w, h))[..., None]
    scene = SPECIES[species][3]
    img = background(rng, scene, h, w) * (1 - alpha) + cv2.warpPerspective(tex, m, (w, h)) * alpha
    if rng.random() < 0.3:  # dappled light or shadow bands
        img = img * (0.75 + 0.5 * (_smooth(rng, h, w, 40) > 0))[..., None]
    if rng.random() < 0.3:  # something in front: a branch, a wave, another animal
        occ = np.zeros((h, w), np.float32)
        axes = (int(w * rng.uniform(0.05, 0.2)), int(h * rng.uniform(0.1, 0.4)))
        cv2.ellipse(occ, (int(rng.uniform(0, w)), int(rng.uniform(0, h))), axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
        img = img * (1 - occ[..., None]) + background(rng, scene, h, w) * 0.6 * occ[..., None]
    shifted = np.clip(img * rng.uniform(0.6, 1.3) * rng.uniform(0.8, 1.2, 3), 0, 255)  # exposure, white balance
    img = 255 * (shifted / 255) ** rng.uniform(0.75, 1.3)
    if rng.random() < 0.3:
        img = _motion_blur(rng, img)
    return np.clip(img + rng.normal(0, rng.uniform(0, 8), img.shape), 0, 255).astype(np.uint8)


def plan(individuals: int, seed: int) -> pd.DataFrame:
    """Photos per individual from a Zipf tail as in the real set; a third more individuals seen only in test."""
    rng = _rng(seed, "plan")
    names = list(SPECIES)
    abundance = np.array([SPECIES[n][0] for n in names])
    species = rng.choice(names, individuals + individuals // 3, p=abundance / abundance.sum())
    rows = []
    for i, kind in enumerate(species):
        known = i < individuals
        n = int(min(rng.zipf(2.0), 60))
        n_train, n_test = (n, int(rng.poisson(0.41 * n))) if known else (0, max(1, n // 2))
        rows += [(i, kind, f"{seed}{i:05d}{j:03d}.jpg", "train" if j < n_train else "test", known)
                 for j in range(n_train + n_test)]
    df = pd.DataFrame(rows, columns=["individual", "species", "image", "part", "known"])
    return df.assign(individual_id=[f"ho{seed}_{i:05d}" for i in df.individual])


def _write_photo(out: Path, seed: int, row) -> None:
    img = render(seed, row.individual, row.species, row.image)
    quality = int(_rng(seed, "quality", row.image).integers(40, 96))  # per photo: no cue to identity
    cv2.imwrite(str(out / f"{row.part}_images" / row.image), img, [cv2.IMWRITE_JPEG_QUALITY, quality])


def write(out: Path, individuals: int = 300, seed: int = 0, jobs: int = -1) -> pd.DataFrame:
    """Render the set into `out` in the Kaggle layout (train.csv last, so its presence marks a finished set)."""
    from joblib import Parallel, delayed
    from tqdm import tqdm

    if (out / "train.csv").exists():
        raise SystemExit(f"{out}/train.csv already exists: choose another folder or delete this one")
    photos = plan(individuals, seed)
    for part in ("train", "test"):
        (out / f"{part}_images").mkdir(parents=True, exist_ok=True)
    work = tqdm(list(photos.itertuples()), desc="heldout", unit="photo")
    Parallel(n_jobs=jobs, batch_size=32)(delayed(_write_photo)(out, seed, r) for r in work)
    test = photos[photos.part == "test"]
    solution = test.assign(individual_id=np.where(test.known, test.individual_id, "new_individual"))
    solution[["image", "individual_id"]].to_csv(out / "solution.csv", index=False)
    train = photos[photos.part == "train"].sample(frac=1.0, random_state=seed)
    train[["image", "species", "individual_id"]].to_csv(out / "train.tmp", index=False)
    (out / "train.tmp").replace(out / "train.csv")
    return photos


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--individuals", type=int, default=300, help="individuals with training photos")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=-1, help="parallel processes (-1: all cores)")
    args = p.parse_args()
    photos = write(args.out, args.individuals, args.seed, args.jobs)
    test = photos[photos.part == "test"]
    print(f"{args.out}: {(photos.part == 'train').sum()} training photos of {args.individuals} individuals, "
          f"{len(test)} test photos, {(~test.known).mean():.0%} of them of new individuals")


if __name__ == "__main__":
    main()

"""A synthetic photo-ID set in the Kaggle Happywhale layout, with the real set's long tail and nuisances.

Each individual has a stable identity (fin or fluke outline, trailing-edge notches, scars and pigment marks that
differ between its two body sides); each photo adds pose, scale, body side, light, colour cast, sea, blur,
occlusion and JPEG loss, with the animal often small in a large frame. A noisy detector box per photo goes to
``crops.csv``. Everything is a function of the seed.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from .errors import NEW, ReidError
from .files import write_csv

log = logging.getLogger(__name__)

CANVAS = 256  # side of the canonical texture an individual is drawn on
# name -> (shape, relative abundance, body grey level range, fin height range, fin sweep range)
SPECIES = {
    "bottlenose_dolphin": ("fin", 0.35, (95, 140), (0.55, 0.75), (0.25, 0.45)),
    "killer_whale": ("fin", 0.15, (15, 35), (0.75, 0.95), (0.0, 0.15)),
    "humpback_whale": ("fluke", 0.30, (25, 50), (0.0, 0.0), (0.0, 0.0)),
    "melon_headed_whale": ("fin", 0.20, (45, 70), (0.45, 0.6), (0.3, 0.5)),
}
# Spellings the real train.csv uses for some rows; the data layer must normalise them.
MISSPELLINGS = {"bottlenose_dolphin": "bottlenose_dolpin", "killer_whale": "kiler_whale"}
# The real train.csv's 30 species labels (four of them misspelt) with their photo counts, and the drawing used for each
KAGGLE_SPECIES = {
    "bottlenose_dolphin": 9664, "beluga": 7443, "humpback_whale": 7392, "blue_whale": 4830, "false_killer_whale": 3326,
    "dusky_dolphin": 3139, "spinner_dolphin": 1700, "melon_headed_whale": 1689, "minke_whale": 1608,
    "killer_whale": 1493, "fin_whale": 1324, "gray_whale": 1123, "bottlenose_dolpin": 1117, "kiler_whale": 962,
    "southern_right_whale": 866, "spotted_dolphin": 490, "sei_whale": 428, "short_finned_pilot_whale": 367,
    "common_dolphin": 347, "cuviers_beaked_whale": 341, "pilot_whale": 262, "long_finned_pilot_whale": 238,
    "white_sided_dolphin": 229, "brydes_whale": 154, "pantropic_spotted_dolphin": 145, "globis": 116,
    "commersons_dolphin": 90, "pygmy_killer_whale": 76, "rough_toothed_dolphin": 60, "frasiers_dolphin": 14,
}
FLUKES, ORCAS = {"humpback_whale", "gray_whale", "southern_right_whale", "blue_whale"}, {"killer_whale", "kiler_whale"}


@dataclass
class SynthSpec:
    individuals: int = 300  # individuals with photos in train
    new: int | None = None  # individuals seen only in test; None: enough for `new_share` of test photos
    new_share: float = 0.25
    tail: float = 2.0  # Zipf exponent of photos per individual (2.0 gives ~60 % singletons, like the real set)
    max_photos: int = 60
    test_ratio: float = 0.41  # known test photos per train photo, as in the real set
    min_width: int = 320
    max_width: int = 640
    seed: int = 0
    species: str = "four"  # four drawn species | kaggle: the real set's 30 labels (misspellings too) and shares


def _hex(*parts) -> str:
    return hashlib.sha1("-".join(map(str, parts)).encode()).hexdigest()


def _bezier(p0, p1, p2, n: int = 40) -> np.ndarray:
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 2 * np.asarray(p0) + 2 * (1 - t) * t * np.asarray(p1) + t**2 * np.asarray(p2)


def _cut_notches(edge: np.ndarray, rng: np.random.Generator, n: int, inward: np.ndarray) -> np.ndarray:
    """Push points of an edge polyline inward at `n` random places: nicks and notches of the trailing edge."""
    edge = edge.copy()
    s = np.linspace(0, 1, len(edge))
    for _ in range(n):
        centre, width, depth = rng.uniform(0.15, 0.85), rng.uniform(0.03, 0.08), rng.uniform(0.04, 0.10) * CANVAS
        profile = np.clip(1 - np.abs(s - centre) / width, 0, None)
        edge += profile[:, None] * depth * inward
    return edge


def _fin_outline(rng: np.random.Generator, height: float, sweep: float) -> np.ndarray:
    c = CANVAS
    base_l, base_r = (0.12 * c, 0.88 * c), (0.78 * c, 0.88 * c)
    tip = ((0.45 + sweep) * c, (0.88 - height) * c)
    lead = _bezier(base_l, (0.2 * c + sweep * 0.3 * c, tip[1] + 0.1 * c), tip)
    trail = _bezier(tip, (tip[0] - rng.uniform(0.05, 0.2) * c, 0.6 * c), base_r)
    trail = _cut_notches(trail, rng, rng.integers(0, 5), np.array([-0.8, -0.6]))
    return np.concatenate([lead, trail, [(0.95 * c, 0.97 * c), (0.05 * c, 0.97 * c)]])


def _fluke_outline(rng: np.random.Generator) -> np.ndarray:
    c = CANVAS
    span, droop = rng.uniform(0.38, 0.46), rng.uniform(-0.05, 0.1)
    left_tip, right_tip = ((0.5 - span) * c, (0.35 + droop) * c), ((0.5 + span) * c, (0.35 + droop) * c)
    notch, stock = (0.5 * c, 0.42 * c), (0.5 * c, 0.78 * c)
    top_l = _cut_notches(_bezier(notch, (0.3 * c, 0.3 * c), left_tip), rng, rng.integers(0, 4), np.array([0, 1.0]))
    bottom_l = _bezier(left_tip, (0.3 * c, 0.62 * c), (0.44 * c, 0.62 * c), 20)
    bottom_r = _bezier((0.56 * c, 0.62 * c), (0.7 * c, 0.62 * c), right_tip, 20)
    top_r = _cut_notches(_bezier(right_tip, (0.7 * c, 0.3 * c), notch), rng, rng.integers(0, 4), np.array([0, 1.0]))
    return np.concatenate([top_l, bottom_l, [(0.46 * c, stock[1]), (0.54 * c, stock[1])], bottom_r, top_r])


def _marks(rng: np.random.Generator, tone: int, light: bool) -> list[tuple]:
    """Scars (rake lines) and pigment patches at random canonical positions, drawn later inside the body."""
    marks = []
    for _ in range(rng.integers(1, 4)):
        x, y = rng.uniform(0.25, 0.75) * CANVAS, rng.uniform(0.35, 0.85) * CANVAS
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.1, 0.3) * CANVAS
        lines = rng.integers(1, 4)
        marks.append(("scar", x, y, angle, length, lines, min(255, tone + rng.integers(70, 140))))
    for _ in range(rng.integers(2, 8) if light else rng.integers(1, 5)):  # fluke undersides are mostly pattern
        x, y = rng.uniform(0.2, 0.8) * CANVAS, rng.uniform(0.3, 0.85) * CANVAS
        axes = rng.uniform(0.03, 0.14 if light else 0.1, 2) * CANVAS
        shade = 235 if light or rng.random() < 0.5 else max(0, tone - 60)
        marks.append(("patch", x, y, rng.uniform(0, 180), axes[0], axes[1], shade))
    return marks


def _draw_marks(img: np.ndarray, marks: list[tuple]) -> None:
    for kind, x, y, a, p, q, shade in marks:
        colour = (int(shade),) * 3
        if kind == "scar":
            d = np.array([np.cos(a), np.sin(a)]) * p / 2
            n = np.array([-np.sin(a), np.cos(a)]) * 0.035 * CANVAS
            for i in range(int(q)):
                o = n * (i - (q - 1) / 2)
                pt1, pt2 = (np.array([x, y]) - d + o).astype(int), (np.array([x, y]) + d + o).astype(int)
                cv2.line(img, tuple(map(int, pt1)), tuple(map(int, pt2)), colour, 3, cv2.LINE_AA)
        else:
            cv2.ellipse(img, (int(x), int(y)), (int(p), int(q)), a, 0, 360, colour, -1, cv2.LINE_AA)


@dataclass
class Individual:
    id: str
    species: str
    outline: np.ndarray
    tone: int
    marks: tuple[list, list]  # left side, right side
    saddle: np.ndarray | None
    label: str = ""  # the species label written to train.csv; empty: `species`


def make_individual(seed: int, index: int, species: str) -> Individual:
    rng = np.random.default_rng([seed, 1, index])
    shape, _, tones, heights, sweeps = SPECIES[species]
    tone = int(rng.integers(*tones))
    outline = _fin_outline(rng, rng.uniform(*heights), rng.uniform(*sweeps)) if shape == "fin" else \
        _fluke_outline(rng)
    marks = (_marks(rng, tone, shape == "fluke"), _marks(rng, tone, shape == "fluke"))
    saddle = None
    if species == "killer_whale":  # the grey saddle patch behind the fin is individual too
        pts = rng.uniform([0.55, 0.7], [0.95, 0.85], (6, 2)) * CANVAS
        saddle = cv2.convexHull(pts.astype(np.float32)).reshape(-1, 2)
    return Individual(_hex(seed, "id", index)[:12], species, outline, tone, marks, saddle)


def render_texture(ind: Individual, side: int) -> np.ndarray:
    """The individual seen from one side, on a transparent canonical canvas (BGRA)."""
    img = np.zeros((CANVAS, CANVAS, 4), np.uint8)
    colour = np.full((CANVAS, CANVAS, 3), ind.tone, np.uint8)
    shade = np.linspace(1.15, 0.8, CANVAS)[:, None, None]  # lit from above
    colour = np.clip(colour * shade, 0, 255).astype(np.uint8)
    if ind.saddle is not None:
        cv2.fillPoly(colour, [ind.saddle.astype(np.int32)], (150, 150, 150), cv2.LINE_AA)
    _draw_marks(colour, ind.marks[side])
    mask = np.zeros((CANVAS, CANVAS), np.uint8)
    cv2.fillPoly(mask, [ind.outline.astype(np.int32)], 255, cv2.LINE_AA)
    img[..., :3], img[..., 3] = colour, mask
    return img[:, ::-1].copy() if side == 1 else img


def _sea(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = np.array([rng.uniform(60, 140), rng.uniform(50, 120), rng.uniform(20, 70)])  # BGR: blue-green-grey
    small = rng.normal(0, 1, (max(2, h // 24), max(2, w // 24)))
    waves = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    y = np.linspace(0, 1, h)[:, None]
    ripple = np.sin(y * rng.uniform(30, 90) + waves * 2) * rng.uniform(5, 20)
    sea = base[None, None, :] * (0.8 + 0.3 * y[..., None]) + (waves * 12 + ripple)[..., None]
    return np.clip(sea, 0, 255).astype(np.float32)


def _place(rng: np.random.Generator, w: int, h: int, shape: str) -> np.ndarray:
    """A perspective transform from the canonical canvas into the photo: scale, position, rotation, yaw."""
    size = rng.uniform(0.3, 0.7) * w if shape == "fluke" else rng.uniform(0.25, 0.6) * w
    size = min(size, 0.95 * h)
    cx, cy = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
    src = np.float32([[0, 0], [CANVAS, 0], [CANVAS, CANVAS], [0, CANVAS]])
    yaw = rng.uniform(-0.15, 0.15)  # one side of the canvas nearer the camera than the other
    corners = np.float32([[-1, -1 + yaw], [1, -1 - yaw], [1, 1 + yaw], [-1, 1 - yaw]]) * size / 2
    angle = np.deg2rad(rng.uniform(-12, 12))
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = corners @ rot.T + [cx, cy] + rng.normal(0, 0.03 * size, (4, 2))
    return cv2.getPerspectiveTransform(src, dst.astype(np.float32))


def render_photo(ind: Individual, seed: int, key: str, widths: tuple[int, int] = (320, 640)
                 ) -> tuple[np.ndarray, tuple[int, int, int, int], int]:
    """One photo of `ind`: (BGR image, visible box x1,y1,x2,y2, JPEG quality)."""
    rng = np.random.default_rng([seed, 2, int(_hex(key)[:8], 16)])
    shape = SPECIES[ind.species][0]
    w = int(rng.integers(widths[0], widths[1] + 1))
    h = int(w * rng.uniform(0.55, 0.8))
    tex = render_texture(ind, int(rng.integers(2)) if shape == "fin" else 0).astype(np.float32)
    waterline = rng.uniform(0.8, 0.92) * CANVAS if shape == "fin" else rng.uniform(0.7, 1.0) * CANVAS
    tex[int(waterline):, :, 3] = 0  # the body under water is not seen
    matrix = _place(rng, w, h, shape)
    warped = cv2.warpPerspective(tex, matrix, (w, h), flags=cv2.INTER_LINEAR)
    alpha = warped[..., 3:] / 255.0
    img = _sea(rng, h, w) * (1 - alpha) + warped[..., :3] * alpha
    ys, xs = np.nonzero(alpha[..., 0] > 0.5)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (0, 0, w, h)
    if rng.random() < 0.25:  # spray or a wave crest over part of the animal
        x, y = rng.uniform(box[0], box[2]), rng.uniform(box[1], box[3])
        axes = (int(rng.uniform(0.1, 0.25) * (box[2] - box[0])) + 1, int(rng.uniform(0.05, 0.15) * h) + 1)
        splash = np.zeros((h, w), np.float32)
        cv2.ellipse(splash, (int(x), int(y)), axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
        splash = cv2.GaussianBlur(splash, (0, 0), 3)[..., None]
        img = img * (1 - 0.85 * splash) + 230 * 0.85 * splash
    gain, cast = rng.uniform(0.6, 1.3), rng.uniform(0.85, 1.15, 3)
    gradient = np.linspace(rng.uniform(0.8, 1.2), rng.uniform(0.8, 1.2), w)[None, :, None]
    img = 255 * (np.clip(img * gain * cast * gradient, 0, 255) / 255) ** rng.uniform(0.8, 1.25)
    sigma = rng.uniform(0, 1.5)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img = img + rng.normal(0, rng.uniform(0, 6), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), box, int(rng.integers(35, 96))


def _detector_box(box: tuple, rng: np.random.Generator, w: int, h: int) -> tuple[int, ...]:
    bw, bh = box[2] - box[0], box[3] - box[1]
    noise = rng.normal(0, 0.04, 4) * [bw, bh, bw, bh]
    x1, y1, x2, y2 = np.array(box) + noise
    return int(max(0, x1)), int(max(0, y1)), int(min(w, x2)), int(min(h, y2))


def plan(spec: SynthSpec) -> tuple[list[Individual], pd.DataFrame]:
    """Who is photographed how often, and which photos go to train or test. No pixels yet."""
    rng = np.random.default_rng([spec.seed, 0])
    names = list(SPECIES)
    weights = np.array([SPECIES[n][1] for n in names])
    counts = np.minimum(rng.zipf(spec.tail, spec.individuals), spec.max_photos)
    test_known = rng.poisson(spec.test_ratio * counts)
    if spec.new is not None:
        new_counts = np.minimum(rng.zipf(spec.tail, spec.new), spec.max_photos)
    else:  # new individuals until their photos are `new_share` of the test photos
        target = int(round(spec.new_share / (1 - spec.new_share) * test_known.sum())) if spec.new_share < 1 else 0
        new_counts = []
        while sum(new_counts) < target:
            new_counts.append(int(min(rng.zipf(spec.tail), spec.max_photos, target - sum(new_counts))))
        new_counts = np.array(new_counts, int)
    n_new = len(new_counts)
    if spec.species == "kaggle":  # labels as in the real train.csv, each individual drawn as the nearest body form
        names, weights = list(KAGGLE_SPECIES), np.array(list(KAGGLE_SPECIES.values()), float)
    elif spec.species != "four":
        raise ReidError(f"synth species {spec.species!r}: use four or kaggle")
    labels = rng.choice(names, spec.individuals + n_new, p=weights / weights.sum())
    people = [make_individual(spec.seed, i, _drawn_as(labels[i])) for i in range(spec.individuals + n_new)]
    for person, label in zip(people, labels, strict=True):
        person.label = str(label)
    rows = []
    for i in range(len(people)):
        known = i < spec.individuals
        n_train, n_test = (counts[i], test_known[i]) if known else (0, new_counts[i - spec.individuals])
        for j in range(n_train + n_test):
            rows.append((i, f"{_hex(spec.seed, 'img', i, j)[:14]}.jpg", "train" if j < n_train else "test", known))
    return people, pd.DataFrame(rows, columns=["individual", "image", "part", "known"])


def _drawn_as(label: str) -> str:
    """The drawn species for a species label: itself, or for the real set's labels the nearest body form."""
    if label in SPECIES:
        return label
    return "humpback_whale" if label in FLUKES else "killer_whale" if label in ORCAS else \
        "melon_headed_whale" if "whale" in label else "bottlenose_dolphin"


def _write_photo(person: Individual, spec: SynthSpec, row, root: Path) -> tuple:
    seed = spec.seed
    img, box, quality = render_photo(person, seed, row.image, (spec.min_width, spec.max_width))
    path = root / f"{row.part}_images" / row.image
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    rng = np.random.default_rng([seed, 3, int(_hex(row.image)[:8], 16)])
    return (row.image, *_detector_box(box, rng, img.shape[1], img.shape[0]))


def write_set(out: str | Path, spec: SynthSpec, jobs: int = -1) -> dict:
    """Render the set into `out`; returns counts. Refuses to write into a folder that already has a train.csv."""
    from joblib import Parallel, delayed

    from .progress import progress_bar

    root = Path(out)
    if (root / "train.csv").exists():
        raise ReidError(f"{root}/train.csv already exists: choose another folder or delete this one")
    for part in ("train_images", "test_images"):
        (root / part).mkdir(parents=True, exist_ok=True)
    people, photos = plan(spec)
    work = progress_bar(list(photos.itertuples()), desc="synth", unit="photo")
    tasks = (delayed(_write_photo)(people[r.individual], spec, r, root) for r in work)
    boxes = Parallel(n_jobs=jobs, batch_size=64)(tasks)
    ids = [people[i].id for i in photos.individual]
    species = [people[i].label or people[i].species for i in photos.individual]
    photos = photos.assign(individual_id=ids, species=species)
    rng = np.random.default_rng([spec.seed, 4])
    train = photos[photos.part == "train"].sample(frac=1.0, random_state=rng.integers(1 << 31))
    spelled = [MISSPELLINGS[s] if s in MISSPELLINGS and spec.species == "four" and rng.random() < 0.1 else s
               for s in train.species]
    test = photos[photos.part == "test"].sort_values("image")
    solution = pd.DataFrame({"image": test.image, "individual_id": np.where(test.known, test.individual_id,
                                                                             NEW)})
    filler = " ".join([NEW, *train.individual_id.value_counts().index[:4]])
    write_csv(root / "crops.csv", pd.DataFrame(boxes, columns=["image", "x1", "y1", "x2", "y2"]))
    write_csv(root / "sample_submission.csv", pd.DataFrame({"image": test.image, "predictions": filler}))
    write_csv(root / "solution.csv", solution)
    train_csv = pd.DataFrame({"image": train.image, "species": spelled, "individual_id": train.individual_id})
    write_csv(root / "train.csv", train_csv)  # last: its presence marks a finished set
    return {"train_photos": len(train), "test_photos": len(test), "individuals": spec.individuals,
            "new_individuals": int((~photos.known).groupby(photos.individual).any().sum()),
            "new_test_share": float((solution.individual_id == NEW).mean())}

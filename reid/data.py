"""Reading the Kaggle layout: CSV validation, species names, splits, photo decoding and crops, Dataset, collate."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from .errors import NEW, ReidError

MAX_PIXELS = 300_000_000  # 300 MP: above any camera's photo; a larger file is a decompression bomb or a scan
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

log = logging.getLogger(__name__)

# The real train.csv spells some species in two ways; 30 labels become 26.
SPECIES_FIXES = {
    "bottlenose_dolpin": "bottlenose_dolphin",
    "kiler_whale": "killer_whale",
    "globis": "short_finned_pilot_whale",
    "pilot_whale": "short_finned_pilot_whale",
}
KNOWN_SPECIES = {
    "beluga", "blue_whale", "bottlenose_dolphin", "brydes_whale", "commersons_dolphin", "common_dolphin",
    "cuviers_beaked_whale", "dusky_dolphin", "false_killer_whale", "fin_whale", "frasiers_dolphin", "gray_whale",
    "humpback_whale", "killer_whale", "long_finned_pilot_whale", "melon_headed_whale", "minke_whale",
    "pantropic_spotted_dolphin", "pygmy_killer_whale", "rough_toothed_dolphin", "sei_whale",
    "short_finned_pilot_whale", "southern_right_whale", "spinner_dolphin", "spotted_dolphin", "white_sided_dolphin",
}


class DataError(ReidError):
    """Input data that cannot be used as it is; the message names the file and rows."""


class BadImage(DataError):
    """A photo that cannot be decoded."""


def _rows(mask: pd.Series, limit: int = 5) -> str:
    """CSV line numbers (header is line 1) of the rows where `mask` holds."""
    lines = (np.flatnonzero(mask.to_numpy()) + 2).tolist()
    more = f" and {len(lines) - limit} more" if len(lines) > limit else ""
    return ", ".join(map(str, lines[:limit])) + more


def read_csv(path: Path, required: list[str],
             fix: str = "--data must be a folder in the Kaggle layout (train.csv, train_images/)") -> pd.DataFrame:
    """Read a CSV as strings (BOM, CRLF and quotes handled), checking that `required` columns exist; `fix` says
    what to do when the file is not there."""
    if not path.is_file():
        raise DataError(f"{path} not found: {fix}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", skipinitialspace=True)
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not a readable CSV: {err}") from err
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {missing}; it has {list(df.columns)}")
    extra = [c for c in df.columns if c not in required]
    if extra:
        log.info("%s: ignoring extra column(s) %s", path, extra)
    return df[required].apply(lambda col: col.str.strip())


def check_names(df: pd.DataFrame, path: Path) -> None:
    """Image names must be plain file names: no folders, no '..', nothing that could leave the data folder."""
    bad = df.image.str.contains(r"[/\\]|^\.\.?$|\x00", regex=True) | (df.image == "")
    if bad.any():
        raise DataError(f"{path}: rows {_rows(bad)} have an empty image name or one with a path separator or '..' "
                        f"(e.g. {df.image[bad].iloc[0]!r}); use plain file names inside the image folder")


def safe_paths(folder: Path, names) -> list[str]:
    """The files `names` (plain names, checked before) inside `folder`, refusing a link that resolves outside it. With
    the folder resolved once, only a link can lead out, so only links are resolved (Kaggle's 80,000 photos: 0.1 s)."""
    base, out = folder.resolve(), []
    for name in names:
        path = base / name
        if path.is_symlink():
            path = path.resolve()
            if not path.is_relative_to(base):
                raise DataError(f"image {name!r} resolves to {path}, outside {folder}; refusing to read it")
        out.append(str(path))
    return out


def species_key(name: str) -> str:
    """One spelling per species: lower case, spaces and hyphens as underscores (`Killer Whale` -> `killer_whale`)."""
    return "_".join(name.strip().lower().replace("-", " ").split())


def normalize_species(species: pd.Series) -> pd.Series:
    """Map case and spacing variants and the real set's misspellings to one name each, logging what changed and
    any unknown name."""
    keyed = species.map(species_key)
    fixed = keyed.replace(SPECIES_FIXES)
    changed = fixed != species
    for (old, new), count in pd.Series(list(zip(species[changed], fixed[changed], strict=True))).value_counts().items():
        log.info("species: %d row(s) '%s' -> '%s'", count, old, new)
    unknown = sorted(set(fixed) - KNOWN_SPECIES - {""})
    if unknown:
        log.warning("species not in the Happywhale list, kept as they are: %s", unknown)
    return fixed


def read_train(root: Path, bad_images: str = "error", check: bool = True) -> pd.DataFrame:
    """train.csv validated: columns, empty ids, duplicates, names, files present. Adds a `path` column."""
    path = root / "train.csv"
    df = read_csv(path, ["image", "species", "individual_id"])
    check_names(df, path)
    empty = df.individual_id == ""
    if empty.any():
        raise DataError(f"{path}: rows {_rows(empty)} have an empty individual_id; fill them or delete the rows")
    twins = df.duplicated(keep="first")
    if twins.any():
        log.warning("%s: dropping %d exact duplicate row(s): lines %s", path, twins.sum(), _rows(twins))
        df = df[~twins].reset_index(drop=True)
    reserved = df.individual_id == NEW
    if reserved.any():
        raise DataError(f"{path}: rows {_rows(reserved)} use the individual_id {NEW!r}, which is the answer for an "
                        "animal absent from the catalogue; give those photos a real id or delete the rows")
    df["species"] = normalize_species(df.species)
    clash = df.image.duplicated(keep=False)
    if clash.any():
        first = df[clash].iloc[0].image
        what = "individual_ids" if df[df.image == first].individual_id.nunique() > 1 else "species"
        raise DataError(f"{path}: rows {_rows(clash)} list the same image twice with different {what} (e.g. "
                        f"{first!r}); keep one row per image")
    folder = root / "train_images"
    df["path"] = safe_paths(folder, df.image)
    df = _drop_missing(df, path, bad_images)
    return check_photos(df, path, bad_images) if check else df


def _drop_missing(df: pd.DataFrame, csv: Path, bad_images: str) -> pd.DataFrame:
    missing = ~df.path.map(lambda p: Path(p).is_file())
    if not missing.any():
        return df
    msg = f"{csv}: rows {_rows(missing)} name image files that do not exist (e.g. {df.path[missing].iloc[0]})"
    if bad_images == "error":
        raise DataError(msg + "; restore them, delete the rows, or set data.bad_images=skip")
    log.warning("%s; skipping %d row(s) (data.bad_images=skip)", msg, missing.sum())
    return df[~missing].reset_index(drop=True)


def photo_problem(path: str | Path) -> str:
    """Why a photo cannot be used ('' if it can), from its header and its last bytes: fast enough for every photo
    of a data set before training, where a bad one would otherwise stop an epoch half-way."""
    path = Path(path)
    try:
        original_size(path)
    except BadImage as err:
        return str(err).removeprefix(f"{path}: ")
    return "truncated JPEG (no end-of-image marker)" if _looks_truncated(path) else ""


def check_photos(df: pd.DataFrame, csv: Path, bad_images: str) -> pd.DataFrame:
    """Every photo of `df` checked once (a progress bar): under `error` one message naming every bad file, under
    `skip` the bad rows dropped and counted."""
    from .progress import progress_bar

    problems = [photo_problem(p) for p in progress_bar(df.path, desc="check photos", unit="photo", leave=False)]
    bad = np.array([bool(p) for p in problems])
    if not bad.any():
        return df
    listed = [f"{Path(p).name} ({why})" for p, why in zip(df.path[bad], np.array(problems)[bad], strict=True)]
    names = "; ".join(listed[:20]) + (f"; and {len(listed) - 20} more" if len(listed) > 20 else "")
    if bad_images == "error":
        raise DataError(f"{csv}: {bad.sum()} photo(s) cannot be read: {names}. Replace them, delete their rows, or "
                        "set data.bad_images=skip")
    log.warning("%s: skipping %d photo(s) that cannot be read (data.bad_images=skip): %s", csv, bad.sum(), names)
    return df[~bad].reset_index(drop=True)


def list_test(root: Path) -> pd.DataFrame:
    """Test photos in the order of sample_submission.csv when there is one, else every file of test_images/."""
    folder = root / "test_images"
    sample = root / "sample_submission.csv"
    if sample.is_file():
        df = read_csv(sample, ["image", "predictions"])[["image"]]
        check_names(df, sample)
    elif folder.is_dir():
        df = pd.DataFrame({"image": sorted(p.name for p in folder.iterdir() if p.is_file())})
    else:
        raise DataError(f"{root} has neither sample_submission.csv nor test_images/: nothing to predict")
    if df.empty:
        raise DataError(f"no test photos: {sample if sample.is_file() else folder} is empty")
    df["path"] = safe_paths(folder, df.image)
    missing = ~df.path.map(lambda p: Path(p).is_file())
    if missing.all():
        raise DataError(f"{sample} lists {len(df)} test photos and none is in {folder}: copy the test photos there, "
                        "or delete sample_submission.csv to predict the photos that are there")
    if missing.any():
        log.warning("%d of the %d test photos of %s are not in %s (e.g. %s); they get new_individual first",
                    missing.sum(), len(df), sample, folder, df.image[missing].iloc[0])
    return df


def read_boxes(root: Path, names: list[str]) -> list[dict[str, tuple[float, ...]]]:
    """One {image: (x1, y1, x2, y2)} per box file that exists under `root`."""
    out = []
    for name in names:
        path = root / name
        if not path.is_file():
            log.info("box file %s not found: those photos are used whole", path)
            continue
        df = read_csv(path, ["image", "x1", "y1", "x2", "y2"])
        coords = df[["x1", "y1", "x2", "y2"]].apply(pd.to_numeric, errors="coerce")
        bad = coords.isna().any(axis=1)
        if bad.any():
            log.warning("%s: rows %s have non-numeric boxes; those photos are used whole", path, _rows(bad))
        out.append({img: tuple(row) for img, row, b in zip(df.image, coords.to_numpy(), bad, strict=True) if not b})
    return out


# ---------------------------------------------------------------- splits


def holdout_split(df: pd.DataFrame, val_fraction: float, new_share: float, seed: int) -> np.ndarray:
    """A validation mask that mimics the test set: `new_share` of its photos show individuals absent from train,
    the rest are extra photos of individuals that keep at least one photo in train."""
    rng = np.random.default_rng(seed)
    n_val = int(round(val_fraction * len(df)))
    n_new = int(round(new_share * n_val))
    sizes = df.individual_id.value_counts()
    new_ids, taken = set(), 0
    for ind in rng.permutation(sizes.index.to_numpy()):
        if taken >= n_new:
            break
        if taken + sizes[ind] <= n_new:
            new_ids.add(ind)
            taken += sizes[ind]
    is_val = df.individual_id.isin(new_ids).to_numpy(copy=True)
    order = rng.permutation(len(df))
    keeper = ~pd.Series(df.individual_id.to_numpy()[order]).duplicated().to_numpy()  # first row seen stays in train
    spare = order[~keeper & ~is_val[order]]
    is_val[spare[: max(0, n_val - taken)]] = True
    return is_val


def kfold_split(df: pd.DataFrame, kind: str, folds: int, fold: int, seed: int) -> np.ndarray:
    """Validation mask of fold `fold`: plain K-fold, stratified by species, or grouped by individual."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedKFold

    if kind == "kfold":
        splits = KFold(folds, shuffle=True, random_state=seed).split(df)
    elif kind == "stratified":
        splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(df, df.species)
    else:
        splits = GroupKFold(folds).split(df, groups=df.individual_id)
    _, val_idx = list(splits)[fold]
    mask = np.zeros(len(df), bool)
    mask[val_idx] = True
    return mask


def split_mask(df: pd.DataFrame, split) -> np.ndarray:
    """The validation mask the config's `split` section asks for."""
    if split.kind == "holdout":
        return holdout_split(df, split.val_fraction, split.new_share, split.seed)
    return kfold_split(df, split.kind, split.folds, split.fold, split.seed)


# ---------------------------------------------------------------- photos


def _looks_truncated(path: Path) -> bool:
    """A JPEG cut short: OpenCV fills the missing part with grey and says nothing, so check the end marker,
    and where it is not at the end (some cameras append data) let PIL decode the whole file to be sure."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return False
        f.seek(max(0, path.stat().st_size - 64))
        if b"\xff\xd9" in f.read():
            return False
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, Image.DecompressionBombError):
        return True
    return False


def original_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), read from the header only."""
    from PIL import UnidentifiedImageError

    if not path.is_file() or path.stat().st_size == 0:
        raise BadImage(f"{path}: missing or empty file")
    try:
        with warnings.catch_warnings():  # the size is checked by name below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            w, h = im.size
            if w * h > MAX_PIXELS:  # before the EXIF, which a bomb's header-only file may not hold
                raise BadImage(f"{path}: {w}x{h} pixels, over the {MAX_PIXELS // 1_000_000} MP limit for a photo")
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        why = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise BadImage(f"{path}: not a readable image ({why})") from err
    return w, h


REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
           8: cv2.IMREAD_REDUCED_COLOR_8}


def decode(path: str | Path, reduce: int = 1) -> np.ndarray:
    """RGB uint8 at 1/`reduce` scale; EXIF orientation applied; grey, alpha, 16-bit and CMYK made RGB.
    The file's bytes, not its extension, decide the format."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise BadImage(f"{path}: missing or empty file")
    original_size(path)  # a header over the pixel limit stops here, before anything is decoded
    if _looks_truncated(path):
        raise BadImage(f"{path}: truncated JPEG (no end-of-image marker)")
    img = cv2.imread(str(path), REDUCED[reduce])
    if img is None:
        img = _decode_pil(path, reduce)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _decode_pil(path: Path, reduce: int) -> np.ndarray:
    """Fallback for what OpenCV cannot read; returns BGR like cv2.imread."""
    from PIL import ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            if reduce > 1:
                im = im.reduce(reduce)
            return cv2.cvtColor(np.asarray(im), cv2.COLOR_RGB2BGR)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadImage(f"{path}: not a readable image ({err})") from err


def expand_box(box, margin: float, width: int, height: int) -> tuple[int, int, int, int] | None:
    """The box grown by `margin` of its size on each side and clipped to the photo; None if degenerate."""
    if box is None:
        return None
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    if not (np.isfinite([x1, y1, x2, y2]).all() and bw >= 2 and bh >= 2):
        return None
    x1, x2 = max(0, x1 - margin * bw), min(width, x2 + margin * bw)
    y1, y2 = max(0, y1 - margin * bh), min(height, y2 + margin * bh)
    if x2 - x1 < 2 or y2 - y1 < 2:
        return None
    return int(x1), int(y1), int(np.ceil(x2)), int(np.ceil(y2))


def reduction(region_w: float, region_h: float, size: int, slack: float = 0.9) -> int:
    """Largest JPEG reduction (1, 2, 4, 8) that leaves the region's short side at least `slack` x `size` pixels:
    a 3000x2000 photo at 512 px decodes at 1/4 (500 px, a 2 % stretch) instead of 1/2 (four times the pixels)."""
    k = 1
    while k < 8 and min(region_w, region_h) / (2 * k) >= slack * size:
        k *= 2
    return k


def load_photo(path: str | Path, size: int, box=None, margin: float = 0.0) -> tuple[np.ndarray, bool]:
    """The photo, cropped to its box (grown by `margin`) and resized to size x size, decoded at reduced scale
    where the size allows. Returns (RGB image, whether the box was used)."""
    w, h = original_size(Path(path))
    region = expand_box(box, margin, w, h)
    x1, y1, x2, y2 = region or (0, 0, w, h)
    k = reduction(x2 - x1, y2 - y1, size)
    img = decode(path, k)
    sx, sy = img.shape[1] / w, img.shape[0] / h
    img = img[int(y1 * sy): max(int(y1 * sy) + 1, int(y2 * sy)), int(x1 * sx): max(int(x1 * sx) + 1, int(x2 * sx))]
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA), region is not None


# ---------------------------------------------------------------- dataset


def build_transform(aug, train: bool, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    """albumentations pipeline from the `aug` config section; evaluation only normalizes (by `mean` and `std`, those
    the backbone was pretrained with)."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    steps, a, c = [], aug.affine_strength, aug.color_strength
    if train:
        # a switch at 0 adds no step, so that it draws no random numbers and leaves the other jitters as they were
        steps = [
            A.Affine(scale=(1 - 0.15 * a, 1 + 0.15 * a), translate_percent=(-0.06 * a, 0.06 * a),
                     rotate=(-12 * a, 12 * a), shear=(-5 * a, 5 * a), border_mode=cv2.BORDER_REFLECT_101, p=aug.affine),
            A.HorizontalFlip(p=aug.hflip),
            A.ColorJitter(brightness=0.3 * c, contrast=0.3 * c, saturation=0.3 * c, hue=0.05 * c, p=aug.color),
            *([A.ToGray(p=aug.gray)] if aug.gray else []),
            *([camera_faults(aug.degrade)] if aug.degrade else []),
            A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(0.1, 0.3), hole_width_range=(0.1, 0.3),
                            fill="random_uniform", p=aug.erasing),
        ]
    if train and aug.randaugment:  # RandAugment-style: n operations drawn per photo from one policy
        steps.append(A.SomeOf([
            A.Equalize(p=1), A.AutoContrast(p=1), A.Posterize(p=1), A.Solarize(p=1), A.Sharpen(p=1),
            A.RandomBrightnessContrast(0.3, 0.3, p=1), A.HueSaturationValue(p=1), A.Affine(rotate=(-25, 25), p=1),
            A.Affine(shear=(-15, 15), p=1), A.Affine(translate_percent=(-0.15, 0.15), p=1),
        ], n=aug.randaugment, p=1.0))
    return A.Compose([*steps, A.Normalize(mean=mean, std=std), ToTensorV2()])


def camera_faults(p: float):
    """With probability p, one of the faults of field photos: defocus, motion blur, a small sensor upscaled,
    strong JPEG compression, sensor noise."""
    import albumentations as A

    return A.OneOf([A.GaussianBlur(sigma_limit=(0.5, 1.5)), A.MotionBlur(blur_limit=(3, 7)),
                    A.Downscale(scale_range=(0.4, 0.8)), A.ImageCompression(quality_range=(30, 80)),
                    A.GaussNoise(std_range=(0.02, 0.08))], p=p)


class PhotoDataset(Dataset):
    """Photos with integer labels. An item is an index, or (index, seed) from SeededSampler: then the crop
    margin, the box file and the augmentation are drawn from that seed, so any worker gives the same result."""

    def __init__(self, paths: list[str], labels: list[int], boxes: list[dict], names: list[str], size: int,
                 transform=None, margin: float = 0.1, jitter: float = 0.0, box_probs: list[float] | None = None,
                 cache=None, on_error: str = "raise"):
        self.on_error = on_error  # raise | blank | skip: a grey photo with no label and index -1 (skip: dropped later)
        self.paths, self.labels, self.names = list(paths), list(labels), list(names)
        self.boxes, self.size, self.transform, self.cache = boxes, size, transform, cache
        self.margin, self.jitter = margin, jitter
        self.box_probs = np.asarray(box_probs) / np.sum(box_probs) if box_probs else None

    def __len__(self) -> int:
        return len(self.paths)

    def _box(self, name: str, rng: np.random.Generator | None):
        if not self.boxes:
            return None, 0
        which = rng.choice(len(self.boxes), p=self.box_probs) if rng is not None and len(self.boxes) > 1 else 0
        return self.boxes[which].get(name), which

    def __getitem__(self, item):
        idx, seed = item if isinstance(item, tuple) else (item, None)
        rng = np.random.default_rng(seed) if seed is not None else None
        box, which = self._box(self.names[idx], rng)
        margin = self.margin + (rng.uniform(-self.jitter, self.jitter) if rng is not None else 0.0)
        try:
            img = self._read(idx, box, which, margin)
        except (BadImage, cv2.error, OSError, ValueError) as err:
            if self.on_error == "raise":
                if isinstance(err, BadImage):
                    raise
                raise BadImage(f"{self.paths[idx]}: {err}") from err
            log.warning("%s; %s", err, "skipped" if self.on_error == "skip" else "using a blank photo in its place")
            img = np.full((self.size, self.size, 3), 128, np.uint8)
            if self.transform is not None:
                img = self.transform(image=img)["image"]
            return img, np.full_like(np.asarray(self.labels[0]), -1).tolist(), -1  # no one's label
        if self.transform is not None:
            if seed is not None:
                self.transform.set_random_seed(seed % (1 << 31))
            img = self.transform(image=img)["image"]
        return img, self.labels[idx], idx


    def _read(self, idx: int, box, which: int, margin: float) -> np.ndarray:
        if self.cache is not None:
            return self.cache.load(self.paths[idx], self.names[idx], which, margin, box)
        return load_photo(self.paths[idx], self.size, box, max(0.0, margin))[0]


class SeededSampler(Sampler):
    """Shuffled indices, each paired with a per-sample seed, both a function of (seed, epoch) only:
    a run resumed at an epoch boundary sees exactly the batches of an uninterrupted one. With `world` processes
    each takes its `batch` of every global batch of world * batch photos: the global order is the same for any
    number of processes (a partial last global batch is dropped)."""

    def __init__(self, n: int, seed: int, epoch: int = 0, shuffle: bool = True, labels=None, m_per_class: int = 0,
                 rank: int = 0, world: int = 1, batch: int = 1):
        self.n, self.seed, self.epoch, self.shuffle = n, seed, epoch, shuffle
        self.labels, self.m = labels, m_per_class
        self.rank, self.world, self.batch = rank, world, batch

    def __len__(self) -> int:
        return self.n if self.world == 1 else self.n // (self.world * self.batch) * self.batch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = self._order(rng)
        seeds = rng.integers(0, 1 << 62, self.n)
        if self.world > 1:
            mine = np.arange(len(self) * self.world).reshape(-1, self.world, self.batch)[:, self.rank].ravel()
            order, seeds = order[mine], seeds[mine]
        return iter(zip(order.tolist(), seeds.tolist(), strict=True))

    def _order(self, rng: np.random.Generator) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return self._m_per_class(rng) if self.m else rng.permutation(self.n)

    def _m_per_class(self, rng: np.random.Generator) -> np.ndarray:
        """Runs of m photos of one individual (drawn with replacement when it has fewer), classes shuffled."""
        groups = pd.Series(np.arange(len(self.labels))).groupby(np.asarray(self.labels)).agg(list).tolist()
        out: list[int] = []
        while len(out) < self.n:
            for g in (groups[i] for i in rng.permutation(len(groups))):
                out.extend(rng.choice(g, self.m, replace=len(g) < self.m).tolist())
        return np.array(out[: self.n])


def collate(batch: list) -> dict:
    """Stack photos of possibly different sizes (zero-padded to the largest) with their labels and indices."""
    images, labels, indices = zip(*batch, strict=True)
    h = max(im.shape[-2] for im in images)
    w = max(im.shape[-1] for im in images)
    out = torch.zeros(len(images), images[0].shape[0], h, w, dtype=images[0].dtype)
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im
    return {"images": out, "labels": torch.as_tensor(labels), "indices": torch.as_tensor(indices)}

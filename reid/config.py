"""One typed config: defaults live here, YAML files and ``key=value`` overrides change them."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import ReidError


class ConfigError(ReidError):
    """A config file, key or value that cannot be used."""


@dataclass
class DataConfig:
    root: str = "data/synth"
    image_size: int = 128
    crops: list[str] = field(default_factory=lambda: ["crops.csv"])  # box files under root; absent ones are skipped
    crop_probs: list[float] = field(default_factory=list)  # chance of each box file per training photo
    crop_margin: float = 0.1  # share of the box side added on each side
    crop_jitter: float = 0.05  # random change of that margin in training
    cache: bool = False  # read photos from the cache written by `reid prepare`
    cache_dir: str = ""  # default: ROOT/.reid_cache
    num_workers: int = 2
    pin_memory: bool = True  # only used on GPU
    persistent_workers: bool = True
    bad_images: str = "error"  # error: stop and name the file; skip: drop it with a warning and a count
    mean: list[float] = field(default_factory=list)  # input mean, 0-1 scale; empty: the backbone's (saved in the run)
    std: list[float] = field(default_factory=list)  # input std; empty: the backbone's pretrained config in timm


@dataclass
class SplitConfig:
    kind: str = "holdout"  # holdout (mimics test) | kfold | stratified | group
    val_fraction: float = 0.15  # holdout: share of photos in validation
    new_share: float = 0.25  # holdout: share of validation photos whose individual is absent from train
    folds: int = 5
    fold: int = 0
    seed: int = 0


@dataclass
class AugConfig:
    hflip: float = 0.5
    color: float = 0.5  # hue / saturation / contrast / brightness
    gray: float = 0.0  # grey photos: identity lives in outline and marks, not in the camera's colour
    affine: float = 0.5  # shift, scale, rotate
    affine_strength: float = 1.0  # multiplies the affine ranges (scale ±0.15, shift ±6 %, rotate ±12°, shear ±5°)
    color_strength: float = 1.0  # multiplies the colour ranges (brightness, contrast, saturation ±0.3, hue ±0.05)
    degrade: float = 0.0  # one camera fault per photo: blur, motion blur, downscaling, JPEG loss or sensor noise
    erasing: float = 0.0  # random erasing (coarse dropout) probability
    mixup: float = 0.0  # Beta(a, a) parameter; 0 turns it off
    cutmix: float = 0.0  # Beta(a, a) parameter; 0 turns it off
    ricap: float = 0.0  # Beta(a, a) parameter of RICAP's four-photo patchwork; 0 turns it off
    randaugment: int = 0  # operations drawn per photo from a RandAugment-style policy; 0 turns it off
    multiscale: list[float] = field(default_factory=list)  # scales of image_size drawn per batch, e.g. [0.75, 1.25]


@dataclass
class ModelConfig:
    backbone: str = "tf_efficientnet_b0"
    pretrained: bool = False
    weights: str = ""  # weight file (timm or efficientnet_pytorch layout) or package:efficientnet-lite0 (offline)
    out_indices: list[int] = field(default_factory=lambda: [3, 4])
    pooling: str = "gem"  # gem | avg
    gem_p: float = 3.0
    embedding_dim: int = 512
    drop_rate: float = 0.0  # dropout before the embedding layer
    drop_path_rate: float = 0.0  # stochastic depth: chance of skipping a residual block in training (timm)
    stripes: int = 1  # pool each level over this many horizontal bands (PCB parts) instead of the whole map
    # every BatchNorm keeps its running statistics (the backbone's pretrained ones; scale and shift still learn):
    # for batches too small for statistics, and norms that do not depend on how a batch is split between GPUs
    freeze_bn: bool = False
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)


@dataclass
class LossConfig:
    head: str = "arcface"  # arcface | subcenter
    scale: float = 30.0
    margin: float = 0.3  # additive angular margin in radians, as in the ArcFace paper
    sub_centers: int = 3
    label_smoothing: float = 0.0
    head_lr_mult: float = 10.0  # the class centres start random: they learn faster than the backbone
    species_weight: float = 0.0  # weight of a species classification head; 0 turns it off
    margin_rare: float = 0.0  # extra margin (radians) x count^-1/4: grows for individuals with few photos
    pair_weight: float = 0.0  # weight of a triplet loss on hard pairs mined in the batch, beside the head
    pair_margin: float = 0.1
    level_weight: float = 0.0  # weight of deep supervision: an ArcFace head on each pooled level alone; 0 off


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # cosine | step
    amp: bool = True  # mixed precision, GPU only: bf16 autocast slows a CPU training step (make bench, layout)
    channels_last: bool = True  # memory layout of model and batches: faster on GPU and on CPU (make bench)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    val_every: int = 1
    max_steps_per_epoch: int = 0  # 0: the whole epoch
    time_budget_min: float = 0.0  # >0: train for this wall time (schedule follows the clock; resume is not exact)
    grad_clip: float = 5.0
    backbone_lr_mult: float = 1.0  # the backbone's rate as a share of train.lr (pretrained: below 1)
    head_warmup_epochs: float = 0.0  # epochs with the backbone frozen while the new layers and centres settle
    lr_reference_batch: int = 0  # >0: lr is scaled by batch_size / this (the linear scaling rule)
    zero_init_last: bool = False  # zero the last norm of each residual block: blocks start as identities
    ema: float = 0.0  # decay of an exponential moving average of the weights, used for validation; 0: off
    accumulate: int = 1  # batches whose gradients are summed before one optimizer step
    m_per_class: int = 0  # >0: batches of m photos per individual
    teacher: str = ""  # run folder of a teacher for knowledge distillation
    distill_weight: float = 0.0
    distill_temperature: float = 0.1


@dataclass
class PredictConfig:
    batch_size: int = 64
    flip_tta: bool = True
    tta_scales: list[float] = field(default_factory=list)  # multi-size TTA: sides as shares of image_size (empty: 1)
    five_crop: bool = False  # multi-crop TTA: the photo and its four corner and centre crops (ten with flip_tta)
    k: int = 50  # neighbours fetched per query
    threshold: float | None = None  # None: the threshold tuned on validation
    index: str = "flat"  # flat (exact) | hnsw | ivf (approximate, for million-photo catalogues)
    policy: str = "similarity"  # new_individual: similarity threshold | share of test photos | species thresholds
    new_share: float | None = None  # share policy: target share of new-first answers (None: as on validation)
    query_expansion: int = 0  # average each query with its top-n gallery neighbours (0: off)
    rerank: bool = False  # k-reciprocal re-ranking (kept only where it helps on the holdout)
    centre_weight: float = 0.0  # share of the ArcFace class centres' cosine in a candidate's score (0: photos only)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)


CHOICES = {
    "data.bad_images": {"error", "skip"},
    "split.kind": {"holdout", "kfold", "stratified", "group"},
    "model.pooling": {"gem", "avg"},
    "loss.head": {"arcface", "subcenter"},
    "train.optimizer": {"adamw", "sgd", "adabound"},
    "train.schedule": {"cosine", "step"},
    "train.device": {"auto", "cpu", "cuda"},
    "predict.index": {"flat", "hnsw", "ivf"},
    "predict.policy": {"similarity", "share", "species"},
}
# keys of earlier versions, with the value they had by default: a saved run's config.yaml that holds one still loads
RETIRED = {"model.pyramid": False, "model.level_norm": False, "model.output_stride": 32, "aug.progressive": 0.0,
           "aug.perspective": 0.0, "predict.gallery": "photo"}
RANGES = {  # inclusive bounds
    "data.image_size": (16, 4096), "data.crop_margin": (0.0, 2.0), "data.crop_jitter": (0.0, 1.0),
    "data.num_workers": (0, 256), "split.val_fraction": (0.0, 0.9), "split.new_share": (0.0, 1.0),
    "split.folds": (2, 100), "split.fold": (0, 99), "aug.hflip": (0.0, 1.0), "aug.color": (0.0, 1.0),
    "aug.affine": (0.0, 1.0), "aug.erasing": (0.0, 1.0), "aug.mixup": (0.0, 100.0), "aug.cutmix": (0.0, 100.0),
    "aug.degrade": (0.0, 1.0), "aug.gray": (0.0, 1.0),
    "aug.affine_strength": (0.0, 3.0), "aug.color_strength": (0.0, 3.0),
    "model.gem_p": (1.0, 20.0), "model.embedding_dim": (2, 65536), "model.drop_rate": (0.0, 1.0),
    "model.drop_path_rate": (0.0, 1.0), "model.stripes": (1, 64),
    "loss.scale": (1.0, 1000.0), "loss.margin": (0.0, 1.5), "loss.sub_centers": (1, 100),
    "loss.label_smoothing": (0.0, 0.99), "loss.head_lr_mult": (0.0, 1e4), "loss.species_weight": (0.0, 100.0),
    "train.epochs": (1, 100000), "train.batch_size": (2, 65536), "train.lr": (0.0, 10.0),
    "train.weight_decay": (0.0, 10.0), "train.warmup_epochs": (0.0, 1000.0), "train.val_every": (1, 100000),
    "train.max_steps_per_epoch": (0, 10**9), "train.grad_clip": (0.0, 1e6), "predict.batch_size": (1, 65536),
    "aug.ricap": (0.0, 100.0), "aug.randaugment": (0, 10), "loss.margin_rare": (0.0, 1.0),
    "loss.pair_weight": (0.0, 100.0), "loss.pair_margin": (0.0, 2.0), "train.lr_reference_batch": (0, 65536),
    "train.ema": (0.0, 0.99999), "train.accumulate": (1, 1024), "train.m_per_class": (0, 1024),
    "train.distill_weight": (0.0, 100.0), "train.time_budget_min": (0.0, 1e6),
    "train.distill_temperature": (1e-3, 100.0), "train.backbone_lr_mult": (0.0, 100.0),
    "train.head_warmup_epochs": (0.0, 1000.0), "loss.level_weight": (0.0, 100.0),
    "predict.k": (1, 2048), "predict.threshold": (-2.0, 2.0), "predict.new_share": (0.0, 1.0),
    "predict.query_expansion": (0, 100), "predict.centre_weight": (0.0, 1.0),
}


def _coerce(key: str, value, hint):
    """Check `value` against the type hint `hint`, converting int to float where a float is expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and value is None:
        return ""
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {hint.__name__}, got {value!r}")
    return value


def _merge(obj, updates: dict, prefix: str = "") -> None:
    """Apply a nested dict of updates to a dataclass in place, naming any unknown key or wrong type."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    for key, value in updates.items():
        name = f"{prefix}{key}"
        if key not in hints:
            if name in RETIRED:
                if value == RETIRED[name]:
                    continue  # an earlier version's key at the value it had by default: nothing to apply
                raise ConfigError(f"config key '{name}' is no longer supported ({name}={value!r}); delete it, or use "
                                  "the reid version that wrote this config")
            known = ", ".join(f"{prefix}{k}" for k in hints)
            raise ConfigError(f"unknown config key '{name}'; known keys here: {known}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{name}.")
        else:
            setattr(obj, key, _coerce(name, value, hints[key]))


def validate(cfg: Config) -> Config:
    """Check choices and ranges; raise ConfigError naming the key."""
    flat = to_dict(cfg)
    for key, allowed in CHOICES.items():
        value = _lookup(flat, key)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {sorted(allowed)}, got {value!r}")
    for key, (lo, hi) in RANGES.items():
        value = _lookup(flat, key)
        if value is not None and not lo <= value <= hi:
            raise ConfigError(f"config key '{key}' must be between {lo} and {hi}, got {value!r}")
    if cfg.data.crop_probs and len(cfg.data.crop_probs) != len(cfg.data.crops):
        raise ConfigError("config key 'data.crop_probs' needs one probability per entry of 'data.crops'")
    if any(not 0.25 <= x <= 4 for x in cfg.predict.tta_scales):
        raise ConfigError(f"config key 'predict.tta_scales' takes shares of data.image_size between 0.25 and 4, "
                          f"got {cfg.predict.tta_scales}")
    for key in ("mean", "std"):
        value = getattr(cfg.data, key)
        if value and (len(value) != 3 or (key == "std" and min(value) <= 0)):
            rule = "three values (R, G, B, 0-1 scale)" + (", all above 0" if key == "std" else "")
            raise ConfigError(f"config key 'data.{key}' takes {rule}, got {value}; leave it empty for the backbone's")
    if cfg.split.fold >= cfg.split.folds:
        raise ConfigError(f"config key 'split.fold' must be below split.folds={cfg.split.folds}")
    return cfg


def _lookup(flat: dict, dotted: str):
    section, key = dotted.split(".")
    return flat[section][key]


def parse_override(text: str) -> dict:
    """Turn ``a.b=value`` into ``{"a": {"b": value}}``, the value read as YAML (so 3, 0.1, true, [3, 4] work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err})") from err
    out: dict = {}
    node = out
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file at `path`, then the overrides, validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        _merge(cfg, data)
    for text in overrides:
        _merge(cfg, parse_override(text))
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)

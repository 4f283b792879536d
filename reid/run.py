"""The run folder: opening it for training (never overwriting silently, never blocked by a failed try), checking
that a resume fits it, and loading a finished run for prediction. Train, predict and the catalogue share it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from .config import Config, load_config, to_dict
from .errors import ReidError
from .files import load_checkpoint

log = logging.getLogger(__name__)

CHECKPOINTS = ("last.pt", "best.pt")
# keys a resume may change: where the data and cache live, how it is read and on what, how long, and prediction
RESUMABLE = ("data.root", "data.num_workers", "data.pin_memory", "data.persistent_workers", "data.cache",
             "data.cache_dir", "data.bad_images", "train.device", "train.epochs", "train.val_every",
             "train.time_budget_min", "predict.")


class RunError(ReidError):
    """A run folder that cannot be used as asked."""


def open_run(out: Path, resume: bool, force: bool) -> None:
    """Refuse to overwrite a run unless `force`; with `resume`, the run must hold last.pt. A folder that never got a
    checkpoint (a try that failed before its first epoch ended) is cleared for the retry."""
    if resume:
        if not (out / "last.pt").is_file():
            raise RunError(f"--resume: {out}/last.pt does not exist; nothing to resume (train it without --resume)")
        return
    if out.exists() and any(out.iterdir()):
        if not any((out / name).is_file() for name in CHECKPOINTS):
            log.info("%s holds no checkpoint (an earlier try failed before one was saved): starting it afresh", out)
            shutil.rmtree(out)
        elif not force:
            raise RunError(f"run folder {out} already exists; use --resume to continue it or --force to replace it")
        else:
            log.warning("--force: deleting the previous run in %s", out)
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def add_log_file(out: Path) -> None:
    handler = logging.FileHandler(out / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume(out: Path, state: dict, cfg: Config, classes: list[str], split: pd.DataFrame) -> None:
    """Refuse a resume whose config, classes or split differ from those last.pt was trained with, naming the
    difference: its best.pt would be paired with other labels."""
    saved, now = _flat(state.get("config", {})), _flat(to_dict(cfg))
    changed = [f"{k} ({saved[k]!r} -> {now[k]!r})" for k in saved
               if k in now and saved[k] != now[k] and not k.startswith(RESUMABLE)]
    if changed:
        raise RunError(f"--resume: this config differs from the run's in {', '.join(changed[:5])}"
                       f"{f' and {len(changed) - 5} more' if len(changed) > 5 else ''}; resume with the run's own "
                       f"config (no --config), or train again with --force")
    labels = out / "labels.json"
    if labels.is_file():
        old = json.loads(labels.read_text())["classes"]
        if old != list(classes):
            added, gone = sorted(set(classes) - set(old)), sorted(set(old) - set(classes))
            raise RunError(f"--resume: train.csv changed since {out} started: {len(added)} individual(s) added "
                           f"{added[:3]}, {len(gone)} gone {gone[:3]}; train again with --force or into a new --out")
    if (out / "split.csv").is_file():
        old = pd.read_csv(out / "split.csv", dtype={"image": str})
        if sorted(zip(old.image, old.is_val, strict=True)) != sorted(zip(split.image, split.is_val, strict=True)):
            raise RunError(f"--resume: the photos of train.csv or the validation split changed since {out} started; "
                           "train again with --force or into a new --out")


def load_run(run: Path, overrides: list[str] = ()):
    """The run's config (with overrides), its best weights in a model, and the best checkpoint's metadata."""
    from .model import ReidNet

    for name in ("config.yaml", "best.pt"):
        if not (run / name).is_file():
            raise RunError(f"{run} is not a finished reid run: {name} is missing (train it first, or --resume it)")
    cfg = load_config(run / "config.yaml", overrides)
    cfg.model.pretrained, cfg.model.weights = False, ""  # the checkpoint holds every weight
    meta = load_checkpoint(run / "best.pt")
    species = json.loads((run / "labels.json").read_text())["species"] if (run / "labels.json").is_file() else []
    model = ReidNet(cfg.model, len(species) if cfg.loss.species_weight else 0)
    model.load_state_dict(meta.pop("model"))
    return cfg, model, meta


def last_epoch(out: Path) -> int:
    """The epoch last.pt holds (0: none), read from the checkpoint itself, memory-mapped: metrics.csv is written
    after it and may lag it by one epoch when training is stopped in between."""
    if not (out / "last.pt").is_file():
        return 0
    try:
        return int(load_checkpoint(out / "last.pt", mmap=True).get("epoch", 0))
    except ReidError:
        return 0


def save_best(out: Path, model_state: dict, head, epoch: int, tuned: dict) -> None:
    """best.pt (weights, class centres and the tuned record predict uses) and threshold.json, its copy for people,
    written from the same dict; the threshold curve as a plot."""
    from .files import save_checkpoint, write_json
    from .model import class_centres

    centres, rows = class_centres(head)
    record = {"policy": "similarity", "epoch": epoch, **tuned}
    save_checkpoint(out / "best.pt", {"model": model_state, "epoch": epoch, "threshold": tuned["threshold"],
                                      "val_map5": tuned["map5"], "centres": centres, "centre_rows": rows,
                                      "tuned": record})
    write_json(out / "threshold.json", record)
    if tuned["grid"]:
        from .report import plot_threshold

        plot_threshold(tuned, out / "threshold.png")


def save_epoch(out: Path, state: dict, history: list[dict]) -> None:
    """last.pt (everything to resume), metrics.csv and its plot, after every epoch."""
    from .files import save_checkpoint, write_csv
    from .report import plot_metrics

    save_checkpoint(out / "last.pt", state)
    write_csv(out / "metrics.csv", pd.DataFrame(history))
    plot_metrics(history, out / "metrics.png")


def restore(parts: dict, path: Path, state: dict | None = None) -> dict:
    """Load last.pt (or its `state`, already read) into the run's parts ({name: module, optimizer, ... or None});
    returns the checkpoint. A file that does not fit this config's parts is one clear error, not torch's traceback."""
    state = state if state is not None else load_checkpoint(path)
    if bool(state.get("level_heads")) != (parts.get("level_heads") is not None):  # else the optimizer won't fit
        has = "with" if state.get("level_heads") else "without"
        raise RunError(f"{path} was trained {has} loss.level_weight, unlike this config: resume it with its own "
                       "config (no --config), or train again with --force")
    try:
        for name, part in parts.items():
            if part is not None:
                part.load_state_dict(state[name])
    except (RuntimeError, ValueError, KeyError) as err:  # weights or groups of another shape than this config's
        raise RunError(f"{path} does not fit the run this config builds ({str(err).strip().splitlines()[0]}): "
                       "resume it with its own config (no --config), or train again with --force") from err
    return state


def untuned(cfg: Config) -> dict:
    """The record of a run without validation photos: nothing tuned, `predict.threshold` or 0.5 until it is set."""
    threshold = 0.5 if cfg.predict.threshold is None else cfg.predict.threshold
    log.warning("no validation photos, so no new_individual threshold is tuned: predict uses %.2f unless "
                "predict.threshold is set", threshold)
    return {"threshold": threshold, "map5": float("nan"), "grid": [], "curve": [], "map5_similarity": 0.0,
            "map5_share": 0.0, "map5_species": 0.0}

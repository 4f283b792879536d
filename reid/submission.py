"""Submission files: validation against sample_submission.csv, atomic writing, and scoring."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from .data import DataError, read_csv
from .files import write_csv
from .retrieval import NEW, TOP, map_at_5, map_at_5_split

log = logging.getLogger(__name__)


def validate_submission(df: pd.DataFrame, images: list[str]) -> None:
    """Header image,predictions; every expected image exactly once; five unique ids per row."""
    if list(df.columns) != ["image", "predictions"]:
        raise DataError(f"submission header must be image,predictions, got {','.join(df.columns)}")
    dup = df.image[df.image.duplicated()]
    if len(dup):
        raise DataError(f"submission lists {len(dup)} image(s) twice, e.g. {dup.iloc[0]}")
    missing, extra = set(images) - set(df.image), set(df.image) - set(images)
    if missing or extra:
        raise DataError(f"submission images differ from the test set: {len(missing)} missing "
                        f"(e.g. {sorted(missing)[:2]}), {len(extra)} unexpected (e.g. {sorted(extra)[:2]})")
    for image, pred in zip(df.image, df.predictions, strict=True):
        ids = pred.split()
        if len(ids) != TOP or len(set(ids)) != TOP:
            raise DataError(f"submission row {image}: needs five unique ids, got {pred!r}")


def write_submission(path: str | Path, images: list[str], predictions: list[list[str]]) -> Path:
    """Validate, then write atomically: a crash leaves the old file or none, never half of one."""
    df = pd.DataFrame({"image": images, "predictions": [" ".join(p) for p in predictions]})
    validate_submission(df, images)
    return write_csv(path, df)


def score(submission: str | Path, solution: str | Path, candidates: str | Path | None = None,
          train: str | Path | None = None) -> dict:
    """MAP@5 overall and on known / new test photos, with the trivial answer's score for comparison; with the
    candidates file, also top-1 accuracy on new photos, the AUC of 'is new' from the top similarity, and the best
    threshold chosen with hindsight on these answers."""
    sol = read_csv(Path(solution), ["image", "individual_id"], "give the path of an existing CSV")
    sub = read_csv(Path(submission), ["image", "predictions"], "give the path of an existing CSV")
    if train is not None:  # a solution with real ids for every animal: those absent from train are new here
        known = set(read_csv(Path(train), ["image", "species", "individual_id"], "give --train an existing CSV")
                    .individual_id)
        sol["individual_id"] = sol.individual_id.where(sol.individual_id.isin(known), NEW)
    elif not (sol.individual_id == NEW).any():
        log.warning("%s has no %s answer: unless every test animal is in the catalogue, give --train train.csv so "
                    "that ids absent from it count as new", solution, NEW)
    validate_submission(sub, list(sol.image))
    preds = sub.set_index("image").predictions.reindex(sol.image).str.split().tolist()
    truths = sol.individual_id.tolist()
    is_new = sol.individual_id.to_numpy() == NEW
    out = {
        **map_at_5_split(preds, truths),
        "share_new": float(is_new.mean()),
        "trivial_map5": map_at_5([[NEW]] * len(truths), truths),
        "images": len(truths),
    }
    out["top1_known"] = float(np.mean([p[0] == t for p, t, n in zip(preds, truths, is_new, strict=True) if not n])) \
        if (~is_new).any() else float("nan")
    out["new_first_share"] = float(np.mean([p[0] == NEW for p in preds]))
    out["top1_new"] = float(np.mean([p[0] == NEW for p, n in zip(preds, is_new, strict=True) if n])) \
        if is_new.any() else float("nan")
    if candidates is not None:
        out.update(_candidate_scores(Path(candidates), sol, truths, is_new))
    return out


def _candidate_scores(path: Path, sol: pd.DataFrame, truths: list[str], is_new: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    from .retrieval import tune_threshold

    cands = pd.read_csv(path, dtype={"individual_id": str})
    ids = np.full((len(sol), TOP), "", dtype=object)
    sims = np.full((len(sol), TOP), -np.inf, np.float32)
    row = {img: i for i, img in enumerate(sol.image)}
    for img, rank, ind, sim in zip(cands.image, cands["rank"], cands.individual_id, cands.similarity, strict=True):
        if img in row and rank <= TOP:
            ids[row[img], rank - 1], sims[row[img], rank - 1] = ind, sim
    best = tune_threshold(ids, sims, truths)
    top1 = np.where(np.isfinite(sims[:, 0]), sims[:, 0], -1.0)
    auc = roc_auc_score(is_new, -top1) if 0 < is_new.sum() < len(is_new) else float("nan")
    return {"auc_new": float(auc), "hindsight_threshold": best["threshold"], "hindsight_map5": best["map5"]}

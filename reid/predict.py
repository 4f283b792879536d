"""Prediction: load one or more runs, embed gallery (train + validation) and test photos, search, decide, write."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from . import retrieval
from .cache import from_config as cache_from_config
from .config import Config, PredictConfig, load_config
from .data import list_test, read_boxes, read_train
from .files import write_csv
from .inference import embed_frame, memory_format, resolve_device
from .run import RunError, load_run
from .submission import write_submission

log = logging.getLogger(__name__)
SEARCH_DEFAULTS = retrieval.search_settings(PredictConfig(), centres_used=False)  # for a record that lacks a key


def ensemble_embeddings(runs: list[Path], frames: dict[str, pd.DataFrame], overrides: list[str], weights=None,
                        data: Path | None = None) -> tuple[Config, dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Each run's normalized embeddings of each frame, weighted and concatenated (one run: its own), with the
    mask of readable photos; the first run's config decides retrieval, and its best.pt metadata comes back too."""
    weights = weights or [1.0] * len(runs)
    parts, ok, first, first_meta = {k: [] for k in frames}, {}, None, {}
    for run, weight in zip(runs, weights, strict=True):
        cfg, model, meta = load_run(run, overrides)
        if data is not None:
            cfg.data.root = str(data)
        if first is None:
            first, first_meta = cfg, meta
        device = resolve_device(cfg.train.device)
        model.to(device, memory_format=memory_format(cfg))
        boxes = read_boxes(Path(cfg.data.root), cfg.data.crops)
        for name, df in frames.items():
            emb, good = embed_frame(model, df, cfg, boxes, device, cache_from_config(cfg), f"{run.name}:{name}",
                                    on_error="blank")
            parts[name].append(np.sqrt(weight) * emb)
            ok[name] = ok.get(name, good) & good
    joined = {k: retrieval.normalize(np.concatenate(v, axis=1)) for k, v in parts.items()}
    return first, joined, ok, first_meta


def predict(runs: list[Path], data: Path | None = None, out: Path | None = None, overrides: list[str] = (),
            force: bool = False, weights: list[float] | None = None) -> Path:
    """Write a submission for the test photos of `data` (default: the run's data folder)."""
    if not (runs[0] / "config.yaml").is_file():
        raise RunError(f"{runs[0]} is not a reid run: config.yaml is missing")
    cfg = load_config(runs[0] / "config.yaml", overrides)
    root = Path(data or cfg.data.root)
    out = out or runs[0] / "submission.csv"
    if out.exists() and not force:
        raise RunError(f"{out} already exists; pass --force to replace it or --out to write elsewhere")
    check_writable(out)
    if weights and len(weights) != len(runs):
        raise RunError(f"{len(weights)} --weight value(s) for {len(runs)} --run folder(s); give one per run")
    if weights and min(weights) <= 0:
        raise RunError(f"--weight {min(weights):g}: each run's weight must be above 0 (leave a run out instead)")
    tuned_ensemble = len(runs) > 1 and cfg.predict.threshold is None
    if tuned_ensemble:
        check_same_split(runs)
    # the photos were checked at training; one that cannot be read now is masked out of the gallery below
    gallery_df, test_df = read_train(root, cfg.data.bad_images, check=False), list_test(root)
    log.info("gallery: %d photos of %d individuals; test: %d photos", len(gallery_df),
             gallery_df.individual_id.nunique(), len(test_df))
    cfg, emb, ok, meta = ensemble_embeddings(runs, {"gallery": gallery_df, "test": test_df}, overrides, weights, root)
    labels = gallery_df.individual_id.to_numpy()
    tuned = load_tuned(runs[0], cfg, meta)
    if tuned_ensemble:
        tuned = tune_ensemble(runs[0], gallery_df, emb["gallery"], ok["gallery"], cfg)
    qe, rerank = holdout_switches(cfg, tuned)
    centres = run_centres(runs, meta, set(labels[ok["gallery"]])) if cfg.predict.centre_weight else None
    if centres is not None:  # individuals seen only in validation get a stand-in centre on the trained ones' scale
        centres = retrieval.stand_in_centres(emb["gallery"][ok["gallery"]], labels[ok["gallery"]], *centres)
    check_search(retrieval.search_settings(cfg.predict, centres is not None), tuned, cfg)
    ids, sims = retrieval.candidates(emb["test"], emb["gallery"][ok["gallery"]], labels[ok["gallery"]],
                                     cfg.predict.k, cfg.predict.index, qe, rerank, centres,
                                     cfg.predict.centre_weight)
    species_of = dict(zip(gallery_df.individual_id, gallery_df.species, strict=True))
    groups = np.array([species_of.get(i, "") for i in ids[:, 0]])
    thresholds = retrieval.policy_thresholds(cfg.predict.policy, sims, tuned, groups, cfg.predict.new_share)
    sims[~ok["test"]] = -np.inf  # unreadable test photos: new_individual first, then the most common ids
    fillers = gallery_df.individual_id.value_counts().index[:retrieval.TOP].tolist()
    preds = retrieval.decide(ids, sims, thresholds, fillers)
    if (~ok["test"]).any():
        log.warning("%d test photo(s) could not be read; they get new_individual first", (~ok["test"]).sum())
    write_submission(out, test_df.image.tolist(), preds)
    write_candidates(out.with_name(out.stem + "_candidates.csv"), test_df.image.tolist(), ids, sims)
    log.info("policy %s (threshold %.3f on average): %.1f %% of test photos get new_individual first; wrote %s",
             cfg.predict.policy, float(np.mean(thresholds)), 100 * np.mean([p[0] == retrieval.NEW for p in preds]), out)
    return out


def holdout_switches(cfg: Config, tuned: dict) -> tuple[int, bool]:
    """Query expansion and re-ranking as asked, less those the holdout showed not to help."""
    qe = cfg.predict.query_expansion if tuned.get("query_expansion_helps", True) else 0
    rerank = cfg.predict.rerank and tuned.get("rerank_helps", True)
    for name, asked, used in (("query expansion", cfg.predict.query_expansion, qe), ("re-ranking", cfg.predict.rerank,
                                                                                     rerank)):
        if asked and not used:
            log.info("%s is off: it did not help on the holdout", name)
    return qe, rerank


def run_centres(runs: list[Path], meta: dict, individuals: set) -> tuple[np.ndarray, np.ndarray] | None:
    """The class centres of a single run (`meta`: its best.pt) and their individual ids, those in the gallery only
    (a centre cannot name an individual the catalogue lacks); None for an ensemble, whose joined embeddings no one
    head trained."""
    if len(runs) > 1 or "centres" not in meta:
        log.info("predict.centre_weight is off: %s", "an ensemble of runs" if len(runs) > 1 else
                 "best.pt has no centres")
        return None
    classes = np.asarray(json.loads((runs[0] / "labels.json").read_text())["classes"], dtype=object)
    ids = classes[meta["centre_rows"].numpy()]
    keep = retrieval.among(ids, individuals)
    return meta["centres"].numpy()[keep], ids[keep]


def check_search(used: dict, tuned: dict, cfg: Config) -> None:
    """Warn for each search setting (centre weight, TTA sides) that differs from the one the threshold was tuned
    with: similarities shift with them."""
    if cfg.predict.threshold is not None:
        return
    for key, value in used.items():
        tuned_at = tuned.get(key) or SEARCH_DEFAULTS[key]  # a run recorded before a key existed, or [] sides
        if tuned_at != value:
            log.warning("the threshold was tuned with predict.%s=%s and is applied at %s: similarities shift with it, "
                        "so set predict.threshold or train with this setting", key, tuned_at, value)


def load_tuned(run: Path, cfg: Config, meta: dict) -> dict:
    """The thresholds tuned on validation, from best.pt (threshold.json is its copy for people, so the two cannot
    disagree), with `predict.threshold` overriding the single one."""
    tuned = dict(meta.get("tuned") or {})
    if not tuned:  # a run saved before best.pt held the whole record
        path = run / "threshold.json"
        tuned = json.loads(path.read_text()) if path.is_file() else {"threshold": meta.get("threshold", 0.5)}
    if cfg.predict.threshold is not None:
        tuned = {**tuned, "threshold": cfg.predict.threshold, "per_species": {}}
        cfg.predict.policy = "similarity"
    elif not tuned.get("grid"):
        log.warning("%s had no validation photos, so no threshold was tuned: new_individual is placed at similarity "
                    "%.2f; set predict.threshold=VALUE to choose it", run, tuned["threshold"])
    return tuned


def check_writable(out: Path) -> None:
    """Fail before any photo is embedded, not after, when the submission cannot be written."""
    import tempfile

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as err:
        raise RunError(f"cannot write {out} ({err.strerror or err}); choose a writable --out") from err


def check_same_split(runs: list[Path]) -> None:
    """An ensemble's threshold is tuned on its own validation similarities, which needs one validation split."""
    splits = [pd.read_csv(r / "split.csv", dtype={"image": str}) if (r / "split.csv").is_file() else None
              for r in runs]
    first = splits[0]
    for run, split in zip(runs[1:], splits[1:], strict=True):
        if first is None or split is None or not first.sort_values("image").reset_index(drop=True).equals(
                split.sort_values("image").reset_index(drop=True)):
            raise RunError(f"{runs[0]} and {run} were validated on different photos, so no threshold can be tuned "
                           "for their ensemble: train them with the same split section, or set predict.threshold")


def tune_ensemble(run: Path, gallery_df: pd.DataFrame, emb: np.ndarray, ok: np.ndarray, cfg: Config) -> dict:
    """The new_individual thresholds tuned on the ensemble's joined embeddings of the runs' validation photos
    (queries) against their training photos (gallery), as `reid train` tunes one run's."""
    split = pd.read_csv(run / "split.csv", dtype={"image": str}).set_index("image").is_val
    is_val = gallery_df.image.map(split).fillna(False).to_numpy(bool)
    train, val = ~is_val & ok, is_val & ok
    known = set(gallery_df.individual_id[train])
    truths = [i if i in known else retrieval.NEW for i in gallery_df.individual_id[val]]
    species_of = dict(zip(gallery_df.individual_id, gallery_df.species, strict=True))
    tuned = retrieval.tune_policies(emb[val], emb[train], gallery_df.individual_id.to_numpy()[train], truths,
                                    cfg.predict, species_of)
    tuned.update(retrieval.search_settings(cfg.predict, centres_used=False))
    log.info("ensemble: threshold %.3f tuned on its own validation similarities (%d photos, MAP@5 %.4f)",
             tuned["threshold"], int(val.sum()), tuned["map5"])
    return tuned


def write_candidates(path: Path, images: list[str], ids: np.ndarray, sims: np.ndarray) -> Path:
    """The ranked known candidates per test photo with their similarities, for people who check matches."""
    q, r = np.nonzero(ids != "")
    df = pd.DataFrame({"image": np.asarray(images)[q], "rank": r + 1, "individual_id": ids[q, r],
                       "similarity": np.round(sims[q, r], 4)})
    return write_csv(path, df)

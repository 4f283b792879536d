"""A saved catalogue for field work: the known photos embedded once, then new photos identified against it without
re-embedding it, and confirmed photos enrolled without retraining. The same embedding, search and decision as
`reid predict` (inference.embed_frame, retrieval.candidates, the run's tuned threshold)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import retrieval
from .data import DataError, photo_problem, read_boxes, read_csv, read_train, species_key
from .errors import NEW
from .files import write_csv, write_json
from .inference import embed_frame, memory_format, resolve_device
from .run import RunError, load_run

log = logging.getLogger(__name__)

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def fingerprint(run: Path) -> str:
    """The identity of a run's weights: the SHA-1 of its best.pt."""
    digest = hashlib.sha1()
    with open(run / "best.pt", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _embedder(run: Path):
    cfg, model, meta = load_run(run)
    device = resolve_device(cfg.train.device)
    return cfg, model.to(device, memory_format=memory_format(cfg)), meta, device


def build(run: Path, out: Path, data: Path | None = None, force: bool = False) -> Path:
    """Embed the run's known photos (train and validation, flip TTA as predict does) into the catalogue folder
    `out`, written beside it and renamed into place in one step."""
    if out.exists() and not force:
        raise RunError(f"{out} already exists; pass --force to replace it or --out elsewhere")
    cfg, model, meta, device = _embedder(run)
    root = Path(data or cfg.data.root)
    photos = read_train(root, cfg.data.bad_images, check=False)  # checked at training; unreadable ones masked below
    emb, ok = embed_frame(model, photos, cfg, read_boxes(root, cfg.data.crops), device, None, "catalogue",
                          on_error="blank")
    photos, emb = photos[ok].reset_index(drop=True), emb[ok]
    classes = np.asarray(json.loads((run / "labels.json").read_text())["classes"], dtype=object)
    centres = (meta["centres"].numpy(), classes[meta["centre_rows"].numpy()]) if "centres" in meta else None
    tuned = meta.get("tuned") or {"threshold": meta.get("threshold", 0.5)}
    manifest = {"run": str(run.resolve()), "fingerprint": fingerprint(run), "threshold": float(tuned["threshold"]),
                "centre_weight": cfg.predict.centre_weight if centres is not None else 0.0, "k": cfg.predict.k,
                "photos": len(photos), "individuals": int(photos.individual_id.nunique()),
                "created": time.strftime("%Y-%m-%d %H:%M:%S"), "version": 1}
    _write(out, manifest, photos[["image", "path", "individual_id", "species"]], emb, centres)
    log.info("catalogue %s: %d photos of %d individuals from %s", out, len(photos), manifest["individuals"], run)
    return out


def _write(out: Path, manifest: dict, photos: pd.DataFrame, emb: np.ndarray, centres) -> None:
    """The whole catalogue into a fresh folder beside `out`, then renamed over it: a crash leaves the old one."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "embeddings.npy", emb.astype(np.float32))
    write_csv(tmp / "photos.csv", photos)
    if centres is not None:
        np.savez(tmp / "centres.npz", vectors=centres[0].astype(np.float32), ids=np.asarray(centres[1], dtype=str))
    write_json(tmp / "manifest.json", manifest)
    if out.exists():
        prev = out.with_name(f"{out.name}.prev")
        shutil.rmtree(prev, ignore_errors=True)
        out.rename(prev)
    tmp.rename(out)


def load(cat: Path) -> tuple[dict, pd.DataFrame, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """(manifest, photos, embeddings, centres) of a catalogue folder."""
    if not (cat / "manifest.json").is_file():
        raise RunError(f"{cat} is not a reid catalogue (no manifest.json): make one with reid catalogue --run RUN")
    manifest = json.loads((cat / "manifest.json").read_text())
    photos = pd.read_csv(cat / "photos.csv", dtype=str, keep_default_na=False)
    emb = np.load(cat / "embeddings.npy")
    centres = None
    if (cat / "centres.npz").is_file():
        z = np.load(cat / "centres.npz")
        centres = (z["vectors"], z["ids"].astype(object))
    return manifest, photos, emb, centres


def _model_for(manifest: dict, cat: Path, need_model: bool = True):
    """The catalogue's run as (config, model, meta, device), refused when its weights changed; without `need_model`
    (ONNX embeds instead) only the config, and no network is built."""
    run = Path(manifest["run"])
    if not (run / "best.pt").is_file():
        raise RunError(f"{cat} was made by the run {run}, which is not there any more; make the catalogue again")
    if fingerprint(run) != manifest["fingerprint"]:
        raise RunError(f"{cat} was embedded by another model than {run}/best.pt holds now (the run was retrained): "
                       "its embeddings cannot be compared; make the catalogue again with reid catalogue")
    if not need_model:
        from .config import load_config

        return load_config(run / "config.yaml"), None, {}, None
    return _embedder(run)


def list_photos(inputs: list[Path]) -> pd.DataFrame:
    """The photos given as files or folders, one row each (image name, path); unreadable ones named and skipped."""
    paths: list[Path] = []
    for item in inputs:
        if item.is_dir():
            paths += sorted(p for p in item.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file())
        elif item.is_file():
            paths.append(item)
        else:
            log.warning("%s: no such file or folder; skipped", item)
    good = []
    for p in paths:
        if why := photo_problem(p):
            log.warning("%s: %s; skipped", p, why)
        else:
            good.append(p)
    if not good:
        raise DataError(f"no readable photo in {', '.join(map(str, inputs))}")
    return pd.DataFrame({"image": [p.name for p in good], "path": [str(p.resolve()) for p in good]})


def embed_onnx(path: Path, queries: pd.DataFrame, cfg, boxes: list[dict], manifest: dict
               ) -> tuple[np.ndarray, np.ndarray]:
    """The photos' embeddings from an ONNX file of the catalogue's model (`reid export`), with onnxruntime."""
    import torch

    from .export import OnnxEmbedder
    from .inference import make_loader, photo_dataset

    embedder = OnnxEmbedder(path)
    if embedder.meta.get("fingerprint") != manifest["fingerprint"]:
        raise RunError(f"--onnx {path} holds another model than the catalogue's; export it from {manifest['run']}")
    loader = make_loader(photo_dataset(queries, cfg, boxes, False, on_error="blank"), cfg, torch.device("cpu"),
                         cfg.predict.batch_size)
    parts = [(embedder(b["images"].numpy()), b["indices"].numpy() >= 0) for b in loader]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def identify(cat: Path, inputs: list[Path], crops: Path | None = None, top: int = retrieval.TOP,
             onnx: Path | None = None) -> pd.DataFrame:
    """Ranked candidates for each photo: rank, individual_id, species, similarity, the candidate's best-matching
    catalogue photo, and whether the photo is likely a new individual under the run's threshold. Only the new
    photos are embedded."""
    manifest, photos, emb, centres = load(cat)
    cfg, model, _, device = _model_for(manifest, cat, need_model=onnx is None)
    queries = list_photos(inputs)
    boxes = read_boxes(crops.parent, [crops.name]) if crops else []
    if onnx is not None:
        q, ok = embed_onnx(onnx, queries, cfg, boxes, manifest)
    else:
        q, ok = embed_frame(model, queries, cfg, boxes, device, None, "identify", on_error="blank")
    queries, q = queries[ok].reset_index(drop=True), q[ok]
    labels = photos.individual_id.to_numpy(dtype=object)
    weight = manifest["centre_weight"]
    if centres is not None and weight:
        centres = retrieval.stand_in_centres(emb, labels, *centres)
    ids, sims = retrieval.candidates(q, emb, labels, manifest["k"], centres=centres if weight else None,
                                     centre_weight=weight)
    ids, sims = ids[:, :top], sims[:, :top]
    photo_sims = q @ emb.T
    species = photos.groupby("individual_id").species.first()
    rows = []
    for i, name in enumerate(queries.image):
        for r, (ind, s) in enumerate(zip(ids[i], sims[i], strict=True)):
            if not ind:
                continue
            own = np.flatnonzero(labels == ind)
            best = own[np.argmax(photo_sims[i, own])]
            rows.append({"image": name, "rank": r + 1, "individual_id": ind, "species": species.get(ind, ""),
                         "similarity": round(float(s), 4), "best_photo": photos.path.iloc[best],
                         "likely_new": bool(sims[i, 0] < manifest["threshold"])})
    table = pd.DataFrame(rows)
    table.attrs.update(queries=dict(zip(queries.image, queries.path, strict=True)), threshold=manifest["threshold"])
    return table


def enroll(cat: Path, decisions: Path, images: Path | None = None) -> dict:
    """Add confirmed photos (`image,individual_id[,species]`) to the catalogue without retraining: known ids gain
    photos, new ids become new individuals. Refuses photos already in it and `new_individual` as an id; keeps the
    previous version as CAT.prev."""
    manifest, photos, emb, centres = load(cat)
    cfg, model, _, device = _model_for(manifest, cat)
    table = pd.read_csv(decisions, dtype=str, keep_default_na=False)
    if not {"image", "individual_id"} <= set(table.columns):
        table = read_csv(decisions, ["image", "individual_id"])  # names the missing columns
    table = table[table.individual_id.str.strip() != ""].copy()  # undecided rows of the review page
    if (table.individual_id == NEW).any():
        raise DataError(f"{decisions}: rows with individual_id {NEW!r}: give each new animal a new id to enroll it")
    table["path"] = [str((images / i if images and not Path(i).is_absolute() else Path(i)).resolve())
                     for i in table.image]
    missing = [p for p in table.path if not Path(p).is_file()]
    if missing:
        raise DataError(f"{decisions}: {len(missing)} photo(s) not found (e.g. {missing[0]}); pass --images FOLDER")
    clash = table.path.isin(photos.path) | table.path.duplicated()
    if clash.any():
        raise DataError(f"{decisions}: {clash.sum()} photo(s) already in the catalogue or listed twice (e.g. "
                        f"{table.path[clash].iloc[0]}); remove those rows")
    known_species = photos.groupby("individual_id").species.first()
    if "species" not in table:
        table["species"] = ""
    table["species"] = table.species.map(species_key)
    given = table.species.where(table.species != "", table.individual_id.map(known_species)).fillna("")
    clash = table.individual_id.isin(known_species.index) & (given != table.individual_id.map(known_species))
    if clash.any():
        row = table[clash].iloc[0]
        raise DataError(f"{decisions}: {row.individual_id} is a {known_species[row.individual_id]} in the catalogue, "
                        f"not a {row.species}; check the id, or give the new animal a new id")
    table["species"] = given
    table["image"] = [Path(p).name for p in table.path]
    new_emb, ok = embed_frame(model, table, cfg, [], device, None, "enroll", on_error="blank")
    if not ok.all():
        raise DataError(f"{decisions}: {int((~ok).sum())} photo(s) could not be read; fix or remove them")
    added = table[["image", "path", "individual_id", "species"]]
    new_ids = sorted(set(added.individual_id) - set(photos.individual_id))
    photos = pd.concat([photos, added], ignore_index=True)
    manifest.update(photos=len(photos), individuals=int(photos.individual_id.nunique()),
                    version=manifest.get("version", 1) + 1, enrolled=time.strftime("%Y-%m-%d %H:%M:%S"))
    _write(cat, manifest, photos, np.concatenate([emb, new_emb]), centres)
    log.info("enrolled %d photo(s) into %s: %d new individual(s) %s", len(added), cat, len(new_ids), new_ids[:5])
    return {"photos": len(added), "new_individuals": new_ids, "version": manifest["version"]}

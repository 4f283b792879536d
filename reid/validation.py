"""End-of-epoch validation: the training photos as gallery, the validation photos as queries, searched as predict
searches, and the new_individual thresholds tuned on the result."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from . import distributed, retrieval
from .inference import embed_frame
from .model import class_centres


def validate(model: torch.nn.Module, head: torch.nn.Module, df: pd.DataFrame, cfg, boxes: list[dict],
             device: torch.device, classes: list[str], cache=None) -> dict:
    """Validation MAP@5 (all, known, new) and the tuned record (under `_tuned`) of the frame's split; {} without
    validation photos. Under torchrun every process embeds its share of the photos and the first tunes; the others
    get {}."""
    val, train = df[df.is_val], df[~df.is_val]
    if val.empty:
        return {}
    gallery = distributed.shared(lambda f: embed_frame(model, f, cfg, boxes, device, cache, "gallery")[0], train)
    queries = distributed.shared(lambda f: embed_frame(model, f, cfg, boxes, device, cache, "validation")[0], val)
    if not distributed.is_main():
        return {}
    truths = np.where(val.label >= 0, val.individual_id, retrieval.NEW).tolist()
    vectors, rows = class_centres(head)
    tuned = retrieval.tune_policies(queries, gallery, train.individual_id.to_numpy(), truths, cfg.predict,
                                    dict(zip(train.individual_id, train.species, strict=True)),
                                    (vectors.numpy(), np.asarray(classes, dtype=object)[rows.numpy()]))
    tuned.update(retrieval.search_settings(cfg.predict, centres_used=True))
    tuned["examples"] = examples(queries, gallery, val, train, tuned["threshold"], cfg.predict.k)
    return {"val_map5": tuned["map5"], "val_threshold": tuned["threshold"], "val_map5_known": tuned["map5_known"],
            "val_map5_new": tuned["map5_new"], "_tuned": tuned}


def examples(queries: np.ndarray, gallery: np.ndarray, val: pd.DataFrame, train: pd.DataFrame, threshold: float,
             k: int, per_kind: int = 3) -> list[dict]:
    """A few validation photos matched right and a few wrong (by photos alone), with each candidate's best photo:
    what report.html shows a person first."""
    ids, sims = retrieval.candidates(queries[:100], gallery, train.individual_id.to_numpy(), k)
    labels, paths = train.individual_id.to_numpy(), train.path.to_numpy()
    out, kinds = [], {True: 0, False: 0}
    for q, (row, cand, sim) in enumerate(zip(val.head(100).itertuples(), ids, sims, strict=False)):
        known = row.label >= 0
        decided = retrieval.decide(cand[None], sim[None], threshold)[0]
        right = decided[0] == (row.individual_id if known else retrieval.NEW)
        if kinds[right] >= per_kind or not cand[0]:
            continue
        kinds[right] += 1
        photo_sims = gallery @ queries[q]
        out.append({"query": row.path, "truth": row.individual_id if known else retrieval.NEW, "right": bool(right),
                    "answer": decided[0], "candidates": [
                        {"id": c, "similarity": round(float(s), 4),
                         "photo": paths[np.flatnonzero(labels == c)[np.argmax(photo_sims[labels == c])]]}
                        for c, s in zip(cand[:3], sim[:3], strict=True) if c]})
    return out

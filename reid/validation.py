"""End-of-epoch validation: the training photos as gallery, the validation photos as queries, searched as predict
searches, and the new_individual thresholds tuned on the result."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from . import retrieval
from .inference import embed_frame
from .model import class_centres


def validate(model: torch.nn.Module, head: torch.nn.Module, df: pd.DataFrame, cfg, boxes: list[dict],
             device: torch.device, classes: list[str], cache=None) -> dict:
    """Validation MAP@5 (all, known, new) and the tuned record (under `_tuned`) of the frame's split; {} without
    validation photos."""
    val, train = df[df.is_val], df[~df.is_val]
    if val.empty:
        return {}
    gallery, _ = embed_frame(model, train, cfg, boxes, device, cache, "gallery")
    queries, _ = embed_frame(model, val, cfg, boxes, device, cache, "validation")
    truths = np.where(val.label >= 0, val.individual_id, retrieval.NEW).tolist()
    vectors, rows = class_centres(head)
    tuned = retrieval.tune_policies(queries, gallery, train.individual_id.to_numpy(), truths, cfg.predict,
                                    dict(zip(train.individual_id, train.species, strict=True)),
                                    (vectors.numpy(), np.asarray(classes, dtype=object)[rows.numpy()]))
    tuned.update(retrieval.search_settings(cfg.predict, centres_used=True))
    return {"val_map5": tuned["map5"], "val_threshold": tuned["threshold"], "val_map5_known": tuned["map5_known"],
            "val_map5_new": tuned["map5_new"], "_tuned": tuned}

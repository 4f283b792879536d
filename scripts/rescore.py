"""Validation MAP@5 of finished runs under other search settings, from the weights they already have: the same
checkpoint (last.pt: model and class centres) searched each way, so a search-time choice is compared without training.

    python scripts/rescore.py RUN [RUN ...] [--set predict.centre_weight=0 predict.centre_weight=0.5]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from reid.config import load_config
from reid.train import Trainer
from reid.validation import validate


def rescore(run: Path, settings: list[str]) -> list[dict]:
    """One row per setting: the run's validation MAP@5 (all, known, new) with that one `predict.*` override."""
    if bad := [x for x in settings if not x.startswith("predict.")]:
        raise SystemExit(f"rescore: {bad[0]!r} is not a search setting; only predict.* keys change without training")
    trainer = Trainer(load_config(run / "config.yaml", ["data.num_workers=0"]), run)  # built once for all settings
    trainer.load(run / "last.pt")  # weights, centres and the EMA copy that validation uses
    rows = []
    for setting in settings:
        trainer.cfg.predict = load_config(run / "config.yaml", [setting]).predict
        t = trainer
        score = validate(t.eval_model, t.head, t.df, t.cfg, t.boxes, t.device, t.classes, t.cache)
        rows.append({"run": str(run), "seed": trainer.cfg.train.seed, "setting": setting, "val_map5": score["val_map5"],
                     "val_map5_known": score["val_map5_known"], "val_map5_new": score["val_map5_new"]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--set", nargs="+", default=["predict.centre_weight=0", "predict.centre_weight=0.5"],
                   help="config overrides, one search setting each")
    args = p.parse_args()
    out = csv.writer(sys.stdout)  # quoted where a setting holds commas (a list of TTA sides)
    out.writerow(["run", "seed", "setting", "val_map5", "val_map5_known", "val_map5_new"])
    for run in args.runs:
        for r in rescore(run, args.set):
            out.writerow([r["run"], r["seed"], r["setting"], *(f"{r[k]:.4f}" for k in list(r)[3:])])
            sys.stdout.flush()


if __name__ == "__main__":
    main()

"""scripts/ablate.py on hand-made result rows: which runs are still to do, and the table's 'vs plain' column."""

import argparse
import importlib.util
from pathlib import Path

import pandas as pd

spec = importlib.util.spec_from_file_location("ablate", Path(__file__).parents[1] / "scripts/ablate.py")
ablate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablate)
PLAINS = [name for name in ablate.RECIPES if name.startswith("plain")]
DEFAULT = "default (configs/demo.yaml)"


def _rows(scores: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"recipe": name, "seed": seed, "error": "", "overrides": "", "val_map5": s,
                          "val_map5_known": s, "val_map5_new": s, "epochs": 10, "wall_s": 60.0}
                         for name, per_seed in scores.items() for seed, s in enumerate(per_seed)])


def test_vs_plain_is_against_the_best_plain_row():
    assert len(PLAINS) == 3  # AdamW, and SGD at two rates
    scores = {PLAINS[0]: [0.70, 0.72], PLAINS[1]: [0.60, 0.62], PLAINS[2]: [0.77, 0.79], DEFAULT: [0.86, 0.88]}
    md = ablate.table(_rows(scores), "1 epoch", "ablate.py")
    line = next(row for row in md.splitlines() if row.startswith(f"| {DEFAULT}"))
    assert "0.8700 ± 0.0100 (+0.0900 vs plain)" in line


def test_pending_skips_finished_rows_and_keeps_failed_ones():
    done = _rows({DEFAULT: [0.8], PLAINS[0]: [0.7, 0.7]})
    done.loc[done.recipe == PLAINS[0], "error"] = ["", "diverged"]
    args = argparse.Namespace(only=[DEFAULT, PLAINS[0]], seeds=[0, 1])
    jobs = [(name, seed) for name, _, seed in ablate.pending(args, ablate.RECIPES, done)]
    assert jobs == [(PLAINS[0], 1), (DEFAULT, 1)]

"""Recipes side by side on several data sets, paired by seed, scored on each set's test photos.

Each (recipe, data set, seed) trains with `reid train`, predicts the test photos with `reid predict` and scores them
against `solution.csv` (test MAP@5, known / new). One CSV row per run in OUT (an interrupted comparison resumes), and
one table: per recipe and set the mean over seeds, and the paired difference against the first recipe.

    python scripts/compare.py --recipe NAME=CONFIG[:key=value,...] ... --data DIR ... [--seeds 0 1] [--out DIR]

    python scripts/compare.py --recipe scratch=configs/scratch.yaml --recipe pretrained=configs/demo.yaml \
        --data data/synth --data data/heldout --seeds 0 1
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def parse_recipe(text: str) -> tuple[str, str, list[str]]:
    """NAME=CONFIG[:key=value,key=value] -> (name, config, overrides)."""
    name, _, rest = text.partition("=")
    config, _, overrides = rest.partition(":")
    if not name or not config:
        raise SystemExit(f"--recipe {text!r}: write NAME=CONFIG[:key=value,...]")
    return name, config, [o for o in overrides.split(",") if o]


def run_one(name: str, config: str, overrides: list[str], data: Path, seed: int, out: Path) -> dict:
    key = hashlib.sha1(repr((config, overrides, str(data.resolve()), seed)).encode()).hexdigest()[:10]
    run = out / "runs" / key
    reid = [sys.executable, "-m", "reid.cli"]
    start = time.perf_counter()
    train = subprocess.run([*reid, "train", "--config", config, "--data", str(data), "--out", str(run), "--force",
                            f"train.seed={seed}", *overrides], cwd=ROOT, capture_output=True, text=True)
    train_s = time.perf_counter() - start
    row = {"recipe": name, "data": data.name, "seed": seed, "train_s": round(train_s, 1),
           "overrides": " ".join([config, *overrides])}
    if train.returncode:
        return {**row, "error": train.stderr.strip().splitlines()[-1][:200]}
    sub = run / "submission.csv"
    predict = subprocess.run([*reid, "predict", "--run", str(run), "--data", str(data), "--out", str(sub),
                              "--force"], cwd=ROOT, capture_output=True, text=True)
    if predict.returncode:
        return {**row, "error": predict.stderr.strip().splitlines()[-1][:200]}
    sys.path.insert(0, str(ROOT))
    from reid.submission import score

    s = score(sub, data / "solution.csv")
    val = pd.read_csv(run / "metrics.csv").val_map5.max()
    return {**row, "test_map5": s["map5"], "known": s["map5_known"], "new": s["map5_new"], "val_map5": val,
            "total_s": round(time.perf_counter() - start, 1), "error": ""}


def table(df: pd.DataFrame) -> str:
    """Per recipe and set: test MAP@5 per seed and mean, and the paired lead over the first recipe (its SE)."""
    ok = df[df.error.fillna("") == ""]
    first = ok.recipe.iloc[0] if len(ok) else ""
    lines = ["| recipe | set | test MAP@5 per seed | mean | known / new | vs " + first + " (SE) | train s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (recipe, data), g in ok.groupby(["recipe", "data"], sort=False):
        base = ok[(ok.recipe == first) & (ok.data == data)].set_index("seed").test_map5
        diff = (g.set_index("seed").test_map5 - base).dropna()
        lead = "" if recipe == first or diff.empty else (
            f"{diff.mean():+.4f} ({diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float('nan'):.4f})")
        seeds = ", ".join(f"{v:.4f}" for v in g.sort_values("seed").test_map5)
        lines.append(f"| {recipe} | {data} | {seeds} | {g.test_map5.mean():.4f} | {g.known.mean():.3f} / "
                     f"{g['new'].mean():.3f} | {lead} | {g.train_s.mean():.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", action="append", required=True, help="NAME=CONFIG[:key=value,...]; the first is the "
                   "baseline of the paired differences")
    p.add_argument("--data", type=Path, action="append", required=True, help="a data set with solution.csv")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=ROOT / "runs/compare", help="results.csv, table.md and the runs")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from reid.files import write_csv, write_text

    recipes = [parse_recipe(r) for r in args.recipe]
    for data in args.data:
        if not (data / "solution.csv").is_file():
            raise SystemExit(f"--data {data}: no solution.csv to score the test photos against")
    csv = args.out / "results.csv"
    done = pd.read_csv(csv, dtype={"error": str}, keep_default_na=False) if csv.is_file() else \
        pd.DataFrame(columns=["recipe", "data", "seed", "error"])
    for seed in args.seeds:  # seed-major: each finished seed gives paired rows for every recipe
        for data in args.data:
            for name, config, overrides in recipes:
                same = (done.recipe == name) & (done.data == data.name) & (done.seed == seed)
                if (same & (done.error.fillna("") == "")).any():
                    continue
                row = run_one(name, config, overrides, data, seed, args.out)
                print(row, flush=True)
                done = pd.concat([done[~same], pd.DataFrame([row])], ignore_index=True)
                write_csv(csv, done)
                write_text(args.out / "table.md", table(done))
    print(table(done))


if __name__ == "__main__":
    main()

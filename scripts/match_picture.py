"""A picture of one identification from a predicted run: a test photo beside a photo of each of its five candidates,
with their similarities, the right one in green (the README's first picture).

    python scripts/match_picture.py DATA SUBMISSION OUT.jpg [--image NAME]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="data folder with train.csv and solution.csv")
    p.add_argument("submission", type=Path, help="a submission whose _candidates.csv lies beside it")
    p.add_argument("out", type=Path)
    p.add_argument("--image", default=None, help="test photo (default: the first known one matched at rank 1)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from reid.report import plot_match

    cands = pd.read_csv(args.submission.with_name(args.submission.stem + "_candidates.csv"))
    truth = pd.read_csv(args.data / "solution.csv").set_index("image").individual_id
    train = pd.read_csv(args.data / "train.csv")
    first = cands[cands["rank"] == 1].set_index("image").individual_id
    image = args.image or next(i for i in first.index if truth.get(i) == first[i])
    photo = train.groupby("individual_id").image.first()
    rows = cands[cands.image == image].sort_values("rank")
    panels = [(args.data / "train_images" / photo[r.individual_id], r.individual_id, r.similarity,
               r.individual_id == truth[image]) for r in rows.itertuples()]
    plot_match(args.data / "test_images" / image, panels, args.out, f"query\n{truth[image]}")
    print(args.out)


if __name__ == "__main__":
    main()

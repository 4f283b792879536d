"""scripts/ablate.py on hand-made result rows: which runs are still to do, and the table's 'vs plain' column."""

import argparse
import dataclasses

import pandas as pd
import pytest

from reid.config import load_config

DEFAULT = "default (configs/scratch.yaml)"
STEPPED_PLAIN = "plain with SGD (lr 0.1, clip 5), step decay"


@pytest.fixture(scope="module")
def ablate(load_script):
    return load_script("ablate")


@pytest.fixture(scope="module")
def plains(ablate):
    return [name for name in ablate.RECIPES if name.startswith("plain")]


def _rows(scores: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"recipe": name, "seed": seed, "error": "", "overrides": "", "val_map5": s,
                          "val_map5_known": s, "val_map5_new": s, "epochs": 10, "wall_s": 60.0}
                         for name, per_seed in scores.items() for seed, s in enumerate(per_seed)])


def test_vs_plain_is_against_the_best_plain_row(ablate, plains):
    assert len(plains) == 4  # AdamW, SGD at two rates, and SGD at lr 0.1 with step decay
    scores = {plains[0]: [0.70, 0.72], plains[1]: [0.60, 0.62], plains[2]: [0.77, 0.79], plains[3]: [0.74, 0.76],
              DEFAULT: [0.86, 0.88]}
    md = ablate.table(_rows(scores), "1 epoch", "ablate.py")
    line = next(row for row in md.splitlines() if row.startswith(f"| {DEFAULT}"))
    assert "0.8700 ± 0.0100 (+0.0900 vs plain)" in line


def test_pending_skips_finished_rows_and_keeps_failed_ones(ablate, plains):
    done = _rows({DEFAULT: [0.8], plains[0]: [0.7, 0.7]})
    done.loc[done.recipe == plains[0], "error"] = ["", "diverged"]
    args = argparse.Namespace(only=[DEFAULT, plains[0]], seeds=[0, 1])
    jobs = [(name, seed) for name, _, seed in ablate.pending(args, ablate.RECIPES, done)]
    assert jobs == [(plains[0], 1), (DEFAULT, 1)]


def test_plain_recipe_stays_plain_whatever_the_default_adds(ablate):
    cfg = load_config(ablate.ROOT / "configs" / "scratch.yaml", ablate.PLAIN)
    assert (cfg.model.pooling, cfg.model.out_indices, cfg.model.stripes) == ("avg", [4], 1)
    extras = ("label_smoothing", "margin_rare", "species_weight", "pair_weight", "level_weight")
    assert cfg.loss.head == "arcface" and not any(getattr(cfg.loss, key) for key in extras)
    strengths = ("hflip", "affine_strength", "color_strength")
    jitters = {key: value for key, value in dataclasses.asdict(cfg.aug).items() if key not in strengths}
    assert cfg.aug.hflip > 0 and not any(jitters.values()), jitters
    assert cfg.train.schedule == "cosine"  # as its rows were measured, whatever the default's schedule
    stepped = load_config(ablate.ROOT / "configs" / "scratch.yaml", ablate.RECIPES[STEPPED_PLAIN])
    assert (stepped.train.schedule, stepped.train.optimizer, stepped.model.pooling) == ("step", "sgd", "avg")

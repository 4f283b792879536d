"""Shared fixtures: a tiny synthetic set made once per session, and a tiny CPU config."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

TINY = [
    "model.backbone=test_efficientnet", "model.out_indices=[1, 2]", "model.embedding_dim=32",
    "data.image_size=48", "data.num_workers=0", "train.epochs=2", "train.batch_size=16", "train.lr=0.003",
    "train.warmup_epochs=0.5", "predict.batch_size=32",
]


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory):
    from reid.synth import SynthSpec, write_set

    root = tmp_path_factory.mktemp("synth") / "set"
    write_set(root, SynthSpec(individuals=24, seed=3, max_photos=8, min_width=96, max_width=160), jobs=1)
    return root


@pytest.fixture()
def tiny_overrides(tiny_set):
    return [f"data.root={tiny_set}", *TINY]

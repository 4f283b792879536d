"""Shared fixtures: a tiny synthetic set made once per test run, a tiny CPU config, and the scripts/ modules."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

TINY = [
    "model.backbone=test_efficientnet", "model.out_indices=[1, 2]", "model.embedding_dim=32",
    "data.image_size=48", "data.num_workers=0", "train.epochs=2", "train.batch_size=16", "train.lr=0.003",
    "train.warmup_epochs=0.5", "predict.batch_size=32",
]


@pytest.fixture(scope="package")
def tiny_set(tmp_path_factory):
    from reid.synth import SynthSpec, write_set

    root = tmp_path_factory.mktemp("synth") / "set"
    write_set(root, SynthSpec(individuals=24, seed=3, max_photos=8, min_width=96, max_width=160), jobs=1)
    return root


@pytest.fixture()
def tiny_overrides(tiny_set):
    return [f"data.root={tiny_set}", *TINY]


@pytest.fixture(scope="package")
def load_script():
    """Import a file of scripts/ (not a package) as a module: load_script("ablate")."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def browse(page, *flags: str, timeout: int = 60) -> str:
    """Headless chromium on a local page, a fresh profile each time (a shared one can be locked by the last run);
    one retry when it hangs. Returns stdout (the DOM with --dump-dom)."""
    import shutil
    import subprocess
    import tempfile

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    for attempt in range(2):
        with tempfile.TemporaryDirectory() as profile:
            try:
                return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                       "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                                       "--virtual-time-budget=3000", *flags, f"file://{page}"],
                                      capture_output=True, text=True, timeout=timeout, check=True).stdout
            except subprocess.TimeoutExpired:
                if attempt:
                    raise
    return ""

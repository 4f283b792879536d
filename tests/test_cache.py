import os

import cv2
import numpy as np
import pytest

from reid.cache import PhotoCache, items_for, prepare
from reid.data import load_photo


@pytest.fixture()
def photos(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        img = cv2.GaussianBlur(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), (0, 0), 3)
        paths.append(str(tmp_path / f"p{i}.jpg"))
        cv2.imwrite(paths[-1], img)
    return paths


def test_prepare_builds_then_reuses_and_rebuilds_only_what_changed(tmp_path, photos):
    cache = PhotoCache(tmp_path / "cache", 32, 0.1, 0.05)
    boxes = [{"p0.jpg": (10, 10, 200, 150), "p1.jpg": (5, 5, 100, 100)}]
    names = [os.path.basename(p) for p in photos]
    items = items_for(photos, names, boxes)
    assert prepare(cache, items, n_jobs=1)["built"] == 4
    again = prepare(cache, items, n_jobs=1)
    assert again["built"] == 0 and again["reused"] == 4
    cv2.imwrite(photos[2], np.zeros((240, 320, 3), np.uint8))  # a changed photo
    os.utime(photos[2], ns=(1, 10**18))
    boxes[0]["p0.jpg"] = (20, 20, 200, 150)  # a changed box
    changed = prepare(cache, items_for(photos, names, boxes), n_jobs=1)
    assert changed["built"] == 2 and changed["reused"] == 2 and changed["removed_stale"] == 2


def test_interrupted_prepare_resumes(tmp_path, photos):
    cache = PhotoCache(tmp_path / "cache", 32, 0.1)
    items = items_for(photos, photos, [])
    cache.build(*items[0])  # as if a previous run died after one photo
    assert prepare(cache, items, n_jobs=1)["built"] == 3


def test_cache_gives_the_direct_crop(tmp_path, photos):
    box = (40, 30, 280, 200)
    cache = PhotoCache(tmp_path / "cache", 64, 0.1, 0.05)
    for margin in (0.05, 0.1, 0.15):
        direct, _ = load_photo(photos[0], 64, box, margin)
        cached = cache.load(photos[0], "p0.jpg", 0, margin, box)
        assert cached.shape == direct.shape == (64, 64, 3)
        assert np.abs(cached.astype(int) - direct.astype(int)).mean() < 6
    whole = cache.load(photos[1], "p1.jpg", 0, 0.1, None)
    assert np.abs(whole.astype(int) - load_photo(photos[1], 64)[0].astype(int)).mean() < 6


def test_bad_photo_is_reported_not_fatal(tmp_path, photos):
    (tmp_path / "bad.jpg").write_bytes(b"")
    cache = PhotoCache(tmp_path / "cache", 32, 0.1)
    out = prepare(cache, items_for([*photos, str(tmp_path / "bad.jpg")], ["a"] * 5, []), n_jobs=1)
    assert out["failed"] == 1 and out["built"] == 4

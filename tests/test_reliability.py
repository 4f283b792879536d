"""Bad input gets a clear error or a stated policy; nothing half-written; untrusted files stay inert."""

from __future__ import annotations

import os
import pickle
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from reid.cli import main
from reid.data import BadImage, PhotoDataset, load_photo
from reid.errors import ReidError
from reid.files import atomic_write, load_checkpoint, save_checkpoint, write_text


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.csv"
    write_text(target, "old\n")

    def crash(tmp):
        tmp.write_text("half a fi")
        raise KeyboardInterrupt  # as if killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.csv"]


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/reid-pwned",))


def test_hostile_checkpoint_is_refused_without_running_code(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"model": Evil()}, path, pickle_protocol=2)
    if os.path.exists("/tmp/reid-pwned"):
        os.unlink("/tmp/reid-pwned")
    with pytest.raises(ReidError, match="not a loadable reid checkpoint"):
        load_checkpoint(path)
    assert not os.path.exists("/tmp/reid-pwned")
    path.write_bytes(pickle.dumps("x")[:3])
    with pytest.raises(ReidError, match="best.pt"):
        load_checkpoint(path)
    save_checkpoint(path, {"w": torch.ones(2), "epoch": 3, "history": [{"loss": 1.0}]})
    assert load_checkpoint(path)["epoch"] == 3


def test_huge_photo_is_decoded_at_reduced_scale(tmp_path):
    path = tmp_path / "huge.jpg"
    img = np.zeros((9000, 12000, 3), np.uint8)
    img[3000:6000, 4000:8000] = 200
    cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 50])
    out, used = load_photo(path, 64, box=(4000, 3000, 8000, 6000), margin=0.0)
    assert out.shape == (64, 64, 3) and out.mean() > 190 and used


def test_undecodable_photo_in_training_names_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8garbage")
    ds = PhotoDataset([str(tmp_path / "broken.jpg")], [0], [], ["broken.jpg"], 32)
    with pytest.raises(BadImage, match="broken.jpg"):
        ds[0]
    blank = PhotoDataset([str(tmp_path / "broken.jpg")], [0], [], ["broken.jpg"], 32, on_error="blank")
    img, _, idx = blank[0]
    assert idx == -1 and img.shape == (32, 32, 3)


@pytest.mark.parametrize("argv, message", [
    (["train", "--out", "{tmp}/r", "data.root={tmp}/nowhere"], "train.csv not found"),
    (["train", "--out", "{tmp}/r", "train.epochs=0"], "train.epochs"),
    (["train", "--out", "{tmp}/r", "--resume"], "nothing to resume"),
    (["predict", "--run", "{tmp}/nowhere"], "config.yaml is missing"),
    (["evaluate", "{tmp}/no.csv", "{tmp}/no2.csv"], "no2.csv not found"),
])
def test_command_errors_are_one_clear_line(tmp_path, capsys, argv, message):
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unreadable_test_photo_gets_new_individual_first(tmp_path, tiny_set):
    from tests.conftest import TINY

    data = tmp_path / "data"
    shutil.copytree(tiny_set, data)
    victim = pd.read_csv(data / "sample_submission.csv").image.iloc[0]
    (data / "test_images" / victim).write_bytes(b"")
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), f"data.root={data}", *TINY, "train.epochs=1"]) == 0
    out = tmp_path / "s.csv"
    assert main(["predict", "--run", str(run), "--out", str(out), "predict.threshold=-1.5"]) == 0
    sub = pd.read_csv(out).set_index("image").predictions
    assert sub[victim].startswith("new_individual") and not sub.drop(victim).str.startswith("new_individual").any()


def _nan_loss_on(monkeypatch, calls: set[int]):
    """Make the margin loss NaN on the given 0-based calls, real otherwise."""
    import reid.losses

    real, count = reid.losses.head_loss, iter(range(10**6))

    def head_loss(head, emb, labels):
        loss = real(head, emb, labels)
        return loss * float("nan") if next(count) in calls else loss

    monkeypatch.setattr(reid.losses, "head_loss", head_loss)


def test_a_few_non_finite_losses_are_skipped_without_poisoning_the_weights(tmp_path, tiny_overrides, monkeypatch,
                                                                             caplog):
    _nan_loss_on(monkeypatch, {1})
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *tiny_overrides, "train.epochs=1"]) == 0
    weights = load_checkpoint(run / "last.pt")["model"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())
    assert np.isfinite(pd.read_csv(run / "metrics.csv").loss.iloc[0])
    assert "skipped 1 of" in caplog.text


def test_diverged_training_stops_with_one_line_naming_the_learning_rate(tmp_path, tiny_overrides, monkeypatch,
                                                                       capsys):
    import reid.train

    monkeypatch.setattr(reid.train, "MAX_BAD_STEPS", 4)
    _nan_loss_on(monkeypatch, set(range(2, 10**6)))  # two good steps, then NaN
    assert main(["train", "--out", str(tmp_path / "run"), *tiny_overrides, "train.epochs=3"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert last.startswith("reid train: error: training diverged") and "train.lr (now 0.003)" in last

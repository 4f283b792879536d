"""What a new user and a code review broke: failed runs that block a retry, resumes that pair weights with other
labels, Ctrl-C, bad photos and tables, short candidate lists, ensembles, unwritable outputs and the command line."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from reid.cli import build_parser, main
from reid.files import load_checkpoint, write_text
from tests.conftest import TINY


def _copy(tiny_set: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_set, data)
    return data


def _train(run: Path, data: Path, *extra: str) -> int:
    return main(["train", "--out", str(run), f"data.root={data}", *TINY, "train.epochs=1", *extra])


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, tiny_set):
    run = tmp_path_factory.mktemp("recovery") / "run"
    assert _train(run, tiny_set) == 0
    return run


# ---------------------------------------------------------------- runs and checkpoints


def test_a_failed_start_does_not_block_the_retry(tmp_path, tiny_set, capsys):
    data = _copy(tiny_set, tmp_path)
    photo = data / "train_images" / pd.read_csv(data / "train.csv").image.iloc[0]
    kept = photo.read_bytes()
    photo.unlink()
    run = tmp_path / "run"
    assert _train(run, data) == 2
    assert photo.name in capsys.readouterr().err
    assert not (run / "config.yaml").exists()  # nothing written that a retry would trip on
    photo.write_bytes(kept)
    assert _train(run, data) == 0  # the same command, no --force
    assert (run / "best.pt").is_file()


def test_a_resume_that_does_not_fit_the_run_is_refused_before_writing(tmp_path, tiny_set, one_epoch, capsys):
    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    before = {n: (run / n).read_bytes() for n in ("config.yaml", "labels.json", "split.csv")}
    config = tmp_path / "other.yaml"
    write_text(config, (run / "config.yaml").read_text().replace("embedding_dim: 32", "embedding_dim: 16"))
    assert main(["train", "--out", str(run), "--resume", "--config", str(config)]) == 2
    assert "model.embedding_dim (32 -> 16)" in capsys.readouterr().err
    data = _copy(tiny_set, tmp_path)
    table = pd.read_csv(data / "train.csv")
    table.loc[table.index[:3], "individual_id"] = "someone_else"
    table.to_csv(data / "train.csv", index=False)
    assert main(["train", "--out", str(run), "--resume", "--data", str(data), "train.epochs=2"]) == 2
    assert "train.csv changed" in capsys.readouterr().err
    assert {n: (run / n).read_bytes() for n in before} == before


def test_ctrl_c_prints_one_line_with_the_resume_command(tmp_path, tiny_set, monkeypatch, capsys):
    import reid.train

    real, calls = reid.train.Trainer.train_epoch, []

    def epoch(self):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(reid.train.Trainer, "train_epoch", epoch)
    run = tmp_path / "run"
    assert _train(run, tiny_set, "train.epochs=3") == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].endswith(f"reid train: interrupted; {run}/last.pt holds epoch 1. Resume with: reid train --out "
                            f"{run} --resume")
    assert "interrupted" in (run / "log.txt").read_text()
    monkeypatch.setattr(reid.train.Trainer, "train_epoch", real)
    assert main(["train", "--out", str(run), "--resume"]) == 0
    assert "best validation MAP@5 0." in (run / "log.txt").read_text().splitlines()[-1]


def test_ctrl_c_between_the_checkpoint_and_the_metrics_names_the_checkpoints_epoch(tmp_path, tiny_set, monkeypatch,
                                                                                     capsys):
    import reid.files

    write_csv, calls = reid.files.write_csv, []

    def metrics(path, frame, *args, **kwargs):  # the second epoch's last.pt is written, its metrics.csv is not
        if path.name == "metrics.csv":
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return write_csv(path, frame, *args, **kwargs)

    monkeypatch.setattr(reid.files, "write_csv", metrics)
    run = tmp_path / "run"
    assert _train(run, tiny_set, "train.epochs=3") == 130
    assert len(pd.read_csv(run / "metrics.csv")) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"reid train: interrupted; {run}/last.pt holds epoch 2. Resume with: reid train --out {run} --resume")


def test_predict_uses_the_threshold_saved_with_the_weights(tmp_path, tiny_set, one_epoch):
    record = json.loads((one_epoch / "threshold.json").read_text())
    saved = load_checkpoint(one_epoch / "best.pt")
    assert saved["tuned"]["threshold"] == record["threshold"] == saved["threshold"]
    run = tmp_path / "run"
    shutil.copytree(one_epoch, run)
    write_text(run / "threshold.json", json.dumps({**record, "threshold": 2.0}))  # a hand-edited copy
    for folder, out in ((one_epoch, tmp_path / "a.csv"), (run, tmp_path / "b.csv"), (run, tmp_path / "c.csv")):
        extra = ["predict.threshold=-2.0"] if out.name == "c.csv" else []
        assert main(["predict", "--run", str(folder), "--data", str(tiny_set), "--out", str(out), *extra]) == 0
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()  # the copy was not used
    assert (tmp_path / "b.csv").read_text() != (tmp_path / "c.csv").read_text()  # the setting for a change is


def test_the_run_stores_an_absolute_data_root(tmp_path, tiny_set, monkeypatch):
    monkeypatch.chdir(tiny_set.parent)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), f"data.root={tiny_set.name}", *TINY, "train.epochs=1"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["root"] == str(tiny_set)
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "--run", "run", "--out", "s.csv"]) == 0


# ---------------------------------------------------------------- photos and tables


def test_bad_training_photos_are_found_before_training_and_all_named(tmp_path, tiny_set, capsys, caplog):
    data = _copy(tiny_set, tmp_path)
    names = pd.read_csv(data / "train.csv").image.iloc[:2].tolist()
    for name in names:
        photo = data / "train_images" / name
        photo.write_bytes(photo.read_bytes()[: photo.stat().st_size // 2])  # cut short
    assert _train(tmp_path / "run", data) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in names) and "2 photo(s) cannot be read" in err and "Traceback" not in err
    with caplog.at_level(logging.WARNING):
        assert _train(tmp_path / "skip", data, "data.bad_images=skip") == 0
    assert "skipping 2 photo(s)" in caplog.text


def test_a_photo_that_fails_in_a_worker_is_dropped_not_given_a_label(tmp_path):
    from reid.data import PhotoDataset

    good = tmp_path / "good.png"
    import cv2

    cv2.imwrite(str(good), np.full((40, 40, 3), 90, np.uint8))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8garbage")
    ds = PhotoDataset([str(good), str(tmp_path / "bad.jpg")], [[3, 0], [5, 1]], [], ["good.png", "bad.jpg"], 32,
                      on_error="skip")
    assert ds[0][1] == [3, 0]
    _, label, idx = ds[1]
    assert idx == -1 and label == [-1, -1]  # not the last photo's label


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(  # noqa: E731
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_refused_by_name(tmp_path):
    from reid.data import BadImage, decode, photo_problem

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(20000, 20000))  # 400 MP in a few bytes
    assert "over the 300 MP limit" in photo_problem(bomb)
    with pytest.raises(BadImage, match="bomb.png"):
        decode(bomb)
    normal = tmp_path / "normal.png"
    normal.write_bytes(_png_header(6000, 4000))
    assert "MP limit" not in photo_problem(normal)


def test_table_mistakes_get_clear_errors_or_are_normalised(tmp_path, tiny_set, caplog):
    from reid.data import DataError, list_test, read_train

    data = _copy(tiny_set, tmp_path)
    table = pd.read_csv(data / "train.csv")
    table.loc[2, "individual_id"] = "new_individual"
    table.to_csv(data / "train.csv", index=False)
    with pytest.raises(DataError, match="rows 4 use the individual_id 'new_individual'"):
        read_train(data)
    table = pd.read_csv(tiny_set / "train.csv")
    twin = table.iloc[[0]].assign(species="not_" + table.species.iloc[0])
    pd.concat([table, twin]).to_csv(data / "train.csv", index=False)
    with pytest.raises(DataError, match="different species"):
        read_train(data)
    table.loc[0, "species"] = " Killer Whale"
    table.loc[1, "species"] = "killer-whale"
    table.to_csv(data / "train.csv", index=False)
    with caplog.at_level(logging.INFO):
        assert set(read_train(data).species.iloc[:2]) == {"killer_whale"}
    assert "'Killer Whale' -> 'killer_whale'" in caplog.text
    shutil.rmtree(data / "test_images")
    (data / "test_images").mkdir()
    with pytest.raises(DataError, match="none is in .*test_images: copy the test photos there"):
        list_test(data)


# ---------------------------------------------------------------- retrieval and output


def test_a_search_filled_by_one_animal_is_widened_to_five_individuals():
    from reid import retrieval

    rng = np.random.default_rng(0)
    query = retrieval.normalize(rng.normal(size=(1, 8)))
    crowd = retrieval.normalize(query + 0.01 * rng.normal(size=(60, 8)))  # one animal, 60 photos, all nearest
    others = retrieval.normalize(query + 0.5 * rng.normal(size=(6, 8)))
    labels = np.array(["crowd"] * 60 + [f"o{i}" for i in range(6)], dtype=object)
    gallery = np.concatenate([crowd, others])
    ids, sims = retrieval.candidates(query, gallery, labels, k=50)
    assert ids[0, 0] == "crowd" and len(set(ids[0])) == 5 and "" not in ids[0]
    expect = sorted(((float(query[0] @ others[i]), f"o{i}") for i in range(6)), reverse=True)[:4]
    assert list(ids[0, 1:]) == [name for _, name in expect]  # the next best, not the most common


def test_ensembles_tune_their_own_threshold_and_refuse_bad_weights(tmp_path, tiny_set, one_epoch, capsys, caplog):
    out = tmp_path / "e.csv"
    argv = ["predict", "--run", str(one_epoch), "--run", str(one_epoch), "--data", str(tiny_set), "--out", str(out)]
    assert main([*argv, "--weight", "1", "--weight", "0"]) == 2
    assert "must be above 0" in capsys.readouterr().err
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    assert "tuned on its own validation similarities" in caplog.text
    other = tmp_path / "other"
    assert _train(other, tiny_set, "split.seed=7") == 0
    assert main(["predict", "--run", str(one_epoch), "--run", str(other), "--data", str(tiny_set), "--out",
                 str(tmp_path / "f.csv")]) == 2
    assert "validated on different photos" in capsys.readouterr().err


def test_a_run_without_validation_says_how_to_set_the_threshold(tmp_path, tiny_set, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert _train(run, tiny_set, "split.val_fraction=0") == 0
        assert main(["predict", "--run", str(run), "--out", str(tmp_path / "s.csv")]) == 0
    assert caplog.text.count("predict.threshold") >= 2
    assert main(["predict", "--run", str(run), "--out", str(tmp_path / "t.csv"), "predict.threshold=2"]) == 0
    assert pd.read_csv(tmp_path / "t.csv").predictions.str.startswith("new_individual").all()


def test_an_unwritable_output_fails_before_any_embedding(tmp_path, one_epoch, monkeypatch, capsys):
    import reid.predict

    monkeypatch.setattr(reid.predict, "ensemble_embeddings", lambda *a, **k: pytest.fail("embedded first"))
    (tmp_path / "afile").write_text("x")
    assert main(["predict", "--run", str(one_epoch), "--out", str(tmp_path / "afile" / "s.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write" in err and len(err.splitlines()) == 1


def test_outputs_get_the_mode_the_umask_gives(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text(tmp_path / "x.txt", "hello\n")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_pretrained_weights_without_a_network_fail_in_seconds(monkeypatch):
    import socket

    from reid.config import load_config
    from reid.model import ModelError, ReidNet

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    start = time.perf_counter()
    with pytest.raises(ModelError, match="cannot be reached.*model.weights="):
        ReidNet(load_config(None, ["model.backbone=test_efficientnet", "model.pretrained=true"]).model)
    assert time.perf_counter() - start < 5


def test_evaluate_counts_ids_absent_from_train_as_new(tmp_path, tiny_set, capsys):
    solution = pd.read_csv(tiny_set / "solution.csv")
    real = solution.assign(individual_id=[i if i != "new_individual" else f"stranger{n}"
                                          for n, i in enumerate(solution.individual_id)])
    real.to_csv(tmp_path / "real.csv", index=False)
    sub = solution.assign(predictions="new_individual a b c d")[["image", "predictions"]]
    sub.to_csv(tmp_path / "sub.csv", index=False)
    assert main(["evaluate", str(tmp_path / "sub.csv"), str(tmp_path / "real.csv"), "--train",
                 str(tiny_set / "train.csv"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["share_new"] == pytest.approx((solution.individual_id == "new_individual").mean())
    assert s["map5"] == pytest.approx(s["share_new"])
    assert main(["evaluate", str(tmp_path / "sub.csv"), str(tmp_path / "none.csv")]) == 2
    assert "--data" not in capsys.readouterr().err


# ---------------------------------------------------------------- the command line


def test_log_lines_go_above_progress_bars_and_bars_stay_out_of_files(tmp_path, tiny_set, capsys):
    from reid.progress import TqdmHandler, progress_bar

    assert progress_bar(range(3)).disable  # stderr is not a terminal here
    run = tmp_path / "run"
    assert _train(run, tiny_set, "train.epochs=2") == 0
    assert any(isinstance(h, TqdmHandler) for h in logging.getLogger().handlers)
    assert "\r" not in capsys.readouterr().err
    assert "min left" in (run / "log.txt").read_text()


def test_every_option_has_help_and_the_version_and_config_commands_work(capsys):
    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subs.items():
        for action in sub._actions:
            assert action.help, f"reid {name} {action.option_strings or action.dest} has no help line"
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("reid ")
    assert main(["config", "train.epochs=3", "-v"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["epochs"] == 3 and "mean" in resolved["data"] and "centre_weight" in resolved["predict"]
    assert main(["config", "train.nope=1"]) == 2

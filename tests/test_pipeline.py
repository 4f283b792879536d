"""End to end on a tiny synthetic set: train -> predict -> evaluate through the command line, resume after
kill -9, run folders that are never overwritten silently, and determinism on CPU."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from reid.cli import main
from reid.files import load_checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_set):
    from tests.conftest import TINY

    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "--out", str(run), f"data.root={tiny_set}", *TINY]) == 0
    return run


def test_run_folder_holds_everything_to_predict_later(trained):
    for name in ("config.yaml", "last.pt", "best.pt", "labels.json", "threshold.json", "metrics.csv",
                 "metrics.png", "threshold.png", "report.html", "log.txt", "split.csv"):
        assert (trained / name).is_file(), name
    metrics = pd.read_csv(trained / "metrics.csv")
    assert metrics.epoch.tolist() == [1, 2] and metrics.val_map5.notna().all()
    tuned = json.loads((trained / "threshold.json").read_text())
    assert len(tuned["grid"]) == len(tuned["curve"]) and max(tuned["curve"]) == pytest.approx(tuned["map5"])
    split = pd.read_csv(trained / "split.csv")
    new_val = set(split.individual_id[split.is_val]) - set(split.individual_id[~split.is_val])
    assert new_val, "the holdout must contain individuals absent from train"
    classes = json.loads((trained / "labels.json").read_text())["classes"]
    assert len(classes) == split[~split.is_val].individual_id.nunique()


def test_predict_then_evaluate(trained, tiny_set, tmp_path, capsys):
    sub = tmp_path / "sub.csv"
    assert main(["predict", "--run", str(trained), "--data", str(tiny_set), "--out", str(sub)]) == 0
    df = pd.read_csv(sub)
    sample = pd.read_csv(tiny_set / "sample_submission.csv")
    assert list(df.columns) == list(sample.columns) and df.image.tolist() == sample.image.tolist()
    assert all(len(set(p.split())) == 5 for p in df.predictions)
    cands = pd.read_csv(tmp_path / "sub_candidates.csv")
    assert set(cands.image) == set(df.image) and cands.groupby("image").similarity.is_monotonic_decreasing.all()
    capsys.readouterr()
    assert main(["evaluate", str(sub), str(tiny_set / "solution.csv"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= s["map5"] <= 1 and s["trivial_map5"] == pytest.approx(s["share_new"])
    # an existing submission is not replaced without --force
    assert main(["predict", "--run", str(trained), "--data", str(tiny_set), "--out", str(sub)]) == 2
    assert main(["predict", "--run", str(trained), "--data", str(tiny_set), "--out", str(sub), "--force",
                 "predict.threshold=-1.5"]) == 0
    assert not pd.read_csv(sub).predictions.str.startswith("new_individual").any()


def test_class_centres_are_saved_and_blended_at_predict(trained, tiny_set, tmp_path, caplog, monkeypatch):
    import torch

    from reid.data import list_test, read_train
    from reid.predict import ensemble_embeddings

    classes = json.loads((trained / "labels.json").read_text())["classes"]
    centres = load_checkpoint(trained / "best.pt")["centres"].numpy()
    assert len(centres) == len(classes) and np.allclose(np.linalg.norm(centres, axis=1), 1, atol=1e-5)
    out, reads = tmp_path / "c.csv", []
    torch_load = torch.load
    monkeypatch.setattr(torch, "load", lambda path, **kw: reads.append(Path(path)) or torch_load(path, **kw))
    with caplog.at_level(logging.WARNING):
        assert main(["predict", "--run", str(trained), "--data", str(tiny_set), "--out", str(out),
                     "predict.centre_weight=1", "predict.tta_scales=[1, 1.25]"]) == 0
    assert reads == [trained / "best.pt"]  # weights and centres from one read
    assert "tuned with predict.centre_weight=0.0 and is applied at 1.0" in caplog.text  # the run validated on photos
    assert "tuned with predict.tta_scales=[1.0] and is applied at [1.0, 1.25]" in caplog.text
    test, gallery = list_test(tiny_set), read_train(tiny_set)
    _, emb, _, _ = ensemble_embeddings([trained], {"test": test, "gallery": gallery}, ["predict.tta_scales=[1, 1.25]"])
    # at weight 1 an individual scores its centre's cosine; one without a trained centre (validation only) scores its
    # stand-in's: the mean of its photos, its cosine scaled to the trained centres' level
    from reid.retrieval import stand_in_centres

    vectors, ids, scale = stand_in_centres(emb["gallery"], gallery.individual_id.to_numpy(dtype=object), centres,
                                           np.asarray(classes, dtype=object))
    assert set(ids) == set(gallery.individual_id) and len(ids) > len(classes)
    photo = pd.DataFrame(emb["test"] @ vectors.T * scale, columns=ids)
    first = pd.read_csv(tmp_path / "c_candidates.csv").query("rank == 1").set_index("image").loc[test.image]
    assert np.allclose(first.similarity, photo.max(axis=1), atol=1e-3)
    assert (first.individual_id.to_numpy() == photo.idxmax(axis=1).to_numpy()).mean() > 0.9  # ties may swap


def test_threshold_override_and_real_layout_without_boxes(trained, tiny_set, tmp_path):
    """A Kaggle folder has no crops.csv: the same command uses the whole photos."""
    data = tmp_path / "kaggle"
    shutil.copytree(tiny_set, data, ignore=shutil.ignore_patterns("crops.csv", "solution.csv"))
    out = tmp_path / "s.csv"
    assert main(["predict", "--run", str(trained), "--data", str(data), "--out", str(out),
                 "predict.threshold=1.5"]) == 0
    assert pd.read_csv(out).predictions.str.startswith("new_individual").all()


def test_existing_run_is_not_overwritten(trained, tiny_set, capsys):
    before = (trained / "best.pt").stat().st_mtime_ns
    assert main(["train", "--out", str(trained), f"data.root={tiny_set}"]) == 2
    assert "--force" in capsys.readouterr().err
    assert (trained / "best.pt").stat().st_mtime_ns == before
    assert main(["predict", "--run", str(trained.parent / "missing")]) == 2


def _train_cmd(run: Path, tiny_set: Path, *extra: str) -> list[str]:
    from tests.conftest import TINY

    return [sys.executable, "-m", "reid.cli", "train", "--out", str(run), f"data.root={tiny_set}", *TINY,
            "train.epochs=6", *extra]


def test_kill_9_then_resume_gives_the_uninterrupted_result(tmp_path, tiny_set):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight, tiny_set), check=True, env=env, capture_output=True)
    crashed = tmp_path / "crashed"
    proc = subprocess.Popen(_train_cmd(crashed, tiny_set), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (crashed / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(float(torch.rand(1)) * 0.5)  # somewhere inside epoch 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(crashed / "last.pt")["epoch"] < 6, "the run finished before it was killed"
    subprocess.run([*_train_cmd(crashed, tiny_set), "--resume"], check=True, env=env, capture_output=True)
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(crashed / "last.pt")
    assert a["epoch"] == b["epoch"] == 6
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]


def test_same_seed_same_embeddings(trained, tiny_set):
    from reid.data import read_boxes, read_train
    from reid.inference import embed_frame
    from reid.run import load_run

    cfg, model, _ = load_run(trained)
    df = read_train(tiny_set).head(8)
    boxes = read_boxes(tiny_set, cfg.data.crops)
    e1, ok = embed_frame(model, df, cfg, boxes, torch.device("cpu"))
    e2, _ = embed_frame(model, df, cfg, boxes, torch.device("cpu"))
    assert ok.all() and (e1 == e2).all() and abs(float((e1 ** 2).sum(1).mean()) - 1) < 1e-5


def test_ensemble_of_two_runs(trained, tiny_set, tmp_path):
    from reid.data import read_train
    from reid.predict import ensemble_embeddings
    from tests.conftest import TINY

    other = tmp_path / "other"
    assert main(["train", "--out", str(other), f"data.root={tiny_set}", *TINY, "train.seed=1",
                 "model.embedding_dim=16", "train.epochs=1"]) == 0
    frames = {"g": read_train(tiny_set).head(6)}
    _, emb, ok, _ = ensemble_embeddings([trained, other], frames, [], [1.0, 3.0])
    _, alone, _, _ = ensemble_embeddings([other], frames, [])
    assert emb["g"].shape == (6, 32 + 16) and ok["g"].all()
    assert np.allclose(np.linalg.norm(emb["g"], axis=1), 1, atol=1e-5)
    # the second run's part carries weight 3 of 4 of the squared norm, in its own direction
    part = emb["g"][:, 32:]
    assert np.allclose((part ** 2).sum(1), 0.75, atol=1e-4)
    assert np.allclose(part / np.linalg.norm(part, axis=1, keepdims=True), alone["g"], atol=1e-5)
    out = tmp_path / "ens.csv"
    assert main(["predict", "--run", str(trained), "--run", str(other), "--weight", "1", "--weight", "3",
                 "--data", str(tiny_set), "--out", str(out)]) == 0
    assert main(["predict", "--run", str(trained), "--run", str(other), "--weight", "1",
                 "--data", str(tiny_set), "--out", str(tmp_path / "bad.csv")]) == 2


def test_policies_are_recorded_and_applied(trained, tiny_set, tmp_path, capsys):
    tuned = json.loads((trained / "threshold.json").read_text())
    for key in ("map5_similarity", "map5_share", "map5_species", "new_first_share", "per_species"):
        assert key in tuned
    out = tmp_path / "share.csv"
    assert main(["predict", "--run", str(trained), "--data", str(tiny_set), "--out", str(out),
                 "predict.policy=share", "predict.new_share=0.5"]) == 0
    first_new = pd.read_csv(out).predictions.str.startswith("new_individual").mean()
    assert first_new == pytest.approx(0.5, abs=0.05)
    capsys.readouterr()
    assert main(["evaluate", str(out), str(tiny_set / "solution.csv"), "--json"]) == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= s["auc_new"] <= 1 and s["hindsight_map5"] >= s["map5"] - 1e-9


def test_expansion_and_reranking_are_decided_on_the_holdout(tmp_path, tiny_set):
    from tests.conftest import TINY

    run = tmp_path / "qe"
    assert main(["train", "--out", str(run), f"data.root={tiny_set}", *TINY, "train.epochs=1",
                 "predict.query_expansion=3", "predict.rerank=true"]) == 0
    tuned = json.loads((run / "threshold.json").read_text())
    assert isinstance(tuned["query_expansion_helps"], bool) and isinstance(tuned["rerank_helps"], bool)
    out = tmp_path / "s.csv"
    assert main(["predict", "--run", str(run), "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == len(pd.read_csv(tiny_set / "sample_submission.csv"))


def test_data_flag_applies_without_a_config_file(tmp_path, tiny_set):
    from tests.conftest import TINY

    run = tmp_path / "r"
    assert main(["train", "--out", str(run), "--data", str(tiny_set), *TINY, "train.epochs=1"]) == 0
    assert f"root: {tiny_set}" in (run / "config.yaml").read_text()


def test_rescore_searches_one_checkpoint_each_way(trained, load_script):
    rows = load_script("rescore").rescore(trained, ["predict.centre_weight=0", "predict.centre_weight=1"])
    last = pd.read_csv(trained / "metrics.csv").iloc[-1]
    assert rows[0]["val_map5"] == pytest.approx(last.val_map5)  # the search the run was validated with
    assert [r["setting"] for r in rows] == ["predict.centre_weight=0", "predict.centre_weight=1"]
    assert all(0 <= r["val_map5"] <= 1 for r in rows)


def test_report_says_what_a_person_wants_first(trained):
    page = (trained / "report.html").read_text()
    for words in ("55 photos of 24 individuals", "epochs in", "torch ", "Best validation MAP@5", "right and wrong",
                  "<details><summary>Config</summary>", "threshold.png"):
        assert words in page, words
    assert page.index("Best validation") < page.index("<details>")  # the config and the table come last, folded
    assert "data:image/jpeg;base64," in page and ">nan<" not in page.lower()
    tuned = json.loads((trained / "threshold.json").read_text())
    assert {e["right"] for e in tuned["examples"]} <= {True, False} and tuned["examples"]

"""The field workflow on a tiny set: catalogue -> identify -> enroll -> identify again; another model's catalogue is
refused; individuals without a trained class centre are scored on the trained centres' scale."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from reid import retrieval
from reid.cli import main
from tests.conftest import TINY


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_set):
    out = tmp_path_factory.mktemp("field") / "run"
    assert main(["train", "--out", str(out), f"data.root={tiny_set}", *TINY, "train.epochs=2",
                 "predict.centre_weight=0"]) == 0  # photos alone: a tiny model's centres say little
    return out


def test_catalogue_identify_enroll_and_find_the_enrolled_animal(run, tiny_set, tmp_path, capsys, monkeypatch):
    cat = tmp_path / "cat"
    assert main(["catalogue", "--run", str(run), "--out", str(cat)]) == 0
    manifest = json.loads((cat / "manifest.json").read_text())
    train = pd.read_csv(tiny_set / "train.csv")
    assert manifest["photos"] == len(train) and np.load(cat / "embeddings.npy").shape[0] == len(train)
    # the new individuals of the test photos: two photos of one of them, one to enroll and one to find later
    solution = pd.read_csv(tiny_set / "solution.csv")
    new = solution[solution.individual_id == "new_individual"].image.tolist()
    assert main(["identify", "--catalogue", str(cat), str(tiny_set / "test_images" / new[0]), "--out",
                 str(tmp_path / "c.csv")]) == 0
    table = pd.read_csv(tmp_path / "c.csv")
    assert list(table.columns) == ["image", "rank", "individual_id", "species", "similarity", "best_photo",
                                   "likely_new"]
    assert table["rank"].tolist() == [1, 2, 3, 4, 5] and table.similarity.is_monotonic_decreasing
    assert table.best_photo.map(lambda p: (tiny_set / "train_images").resolve() in
                                __import__("pathlib").Path(p).resolve().parents).all()
    # only the new photos are embedded: the catalogue's own photos are never read again
    import reid.catalogue

    real = reid.catalogue.embed_frame
    seen = []
    monkeypatch.setattr(reid.catalogue, "embed_frame", lambda m, df, *a, **k: seen.append(len(df)) or real(m, df, *a,
                                                                                                            **k))
    decisions = tmp_path / "decisions.csv"
    pd.DataFrame({"image": [new[0]], "individual_id": ["whale_007"], "species": ["Humpback Whale"]}).to_csv(
        decisions, index=False)
    assert main(["enroll", "--catalogue", str(cat), "--csv", str(decisions), "--images",
                 str(tiny_set / "test_images")]) == 0
    assert seen == [1] and (tmp_path / "cat.prev" / "manifest.json").is_file()
    photos = pd.read_csv(cat / "photos.csv")
    assert photos.individual_id.iloc[-1] == "whale_007" and photos.species.iloc[-1] == "humpback_whale"
    # the same photo again is refused, and so is new_individual as an id
    assert main(["enroll", "--catalogue", str(cat), "--csv", str(decisions), "--images",
                 str(tiny_set / "test_images")]) == 2
    assert "already in the catalogue" in capsys.readouterr().err
    known = photos.iloc[0]
    pd.DataFrame({"image": [new[1]], "individual_id": [known.individual_id], "species": ["not_" + known.species]}
                 ).to_csv(tmp_path / "clash.csv", index=False)
    assert main(["enroll", "--catalogue", str(cat), "--csv", str(tmp_path / "clash.csv"), "--images",
                 str(tiny_set / "test_images")]) == 2
    assert f"{known.individual_id} is a {known.species} in the catalogue" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["identify", "--catalogue", str(cat), str(tiny_set / "test_images" / new[0])]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[2] == "whale_007"  # the enrolled photo itself: rank 1


def test_a_catalogue_of_another_model_is_refused(run, tiny_set, tmp_path, capsys):
    cat = tmp_path / "cat"
    other = tmp_path / "run"
    shutil.copytree(run, other)
    assert main(["catalogue", "--run", str(other), "--out", str(cat)]) == 0
    assert main(["train", "--out", str(other), "--force", f"data.root={tiny_set}", *TINY, "train.epochs=1",
                 "train.seed=5"]) == 0
    capsys.readouterr()
    photo = next((tiny_set / "test_images").iterdir())
    assert main(["identify", "--catalogue", str(cat), str(photo)]) == 2
    assert "another model" in capsys.readouterr().err


def test_unreadable_photos_are_named_and_skipped(run, tiny_set, tmp_path, caplog):
    cat = tmp_path / "cat"
    assert main(["catalogue", "--run", str(run), "--out", str(cat)]) == 0
    folder = tmp_path / "new"
    folder.mkdir()
    shutil.copy(next((tiny_set / "test_images").iterdir()), folder / "good.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a photo")
    assert main(["identify", "--catalogue", str(cat), str(folder), "--out", str(tmp_path / "c.csv")]) == 0
    assert set(pd.read_csv(tmp_path / "c.csv").image) == {"good.jpg"}
    assert "broken.jpg" in caplog.text


def _rates(seed: int, fair: bool) -> tuple[float, float, float, float]:
    """One animal without a trained centre among eleven with one: how often its own photos rank it first against
    the trained ones' average, and how often it is ranked first for another animal's photo against theirs."""
    rng = np.random.default_rng(seed)
    d, people, nq = 32, 12, 20
    anchors = retrieval.normalize(rng.normal(size=(people, d)))
    ids = np.array([f"p{i}" for i in range(people)], dtype=object)
    labels = np.repeat(ids, 4)
    emb = retrieval.normalize(np.repeat(anchors, 4, axis=0) + 0.4 * rng.normal(size=(people * 4, d)))
    centres = retrieval.normalize(anchors + 0.5 * rng.normal(size=(people, d)))  # ArcFace centres: off the photos
    queries = retrieval.normalize(np.repeat(anchors, nq, axis=0) + 0.4 * rng.normal(size=(people * nq, d)))
    truth, without = np.repeat(ids, nq), ids[-1]
    vectors, cids, scale = retrieval.stand_in_centres(emb, labels, centres[:-1], ids[:-1])
    assert cids[-1] == without and 0 < scale[-1] < 1 and (scale[:-1] == 1).all()
    c = (vectors, cids, scale) if fair else (vectors, cids)
    first = retrieval.candidates(queries, emb, labels, 50, centres=c, centre_weight=0.5)[0][:, 0]
    others = len(truth) - nq
    return ((first[truth == without] == without).mean(), np.mean([(first[truth == p] == p).mean() for p in ids[:-1]]),
            ((first == without) & (truth != without)).sum() / others,
            np.mean([((first == p) & (truth != p)).sum() / others for p in ids[:-1]]))


def test_an_individual_without_a_centre_is_neither_favoured_nor_buried():
    own, trained, false_own, false_trained = np.mean([_rates(s, fair=True) for s in range(6)], axis=0)
    assert abs(own - trained) < 0.1  # found by its own photos as often as a trained animal
    assert false_own < 1.5 * false_trained  # and put first for others' photos about as often
    _, _, false_raw, _ = np.mean([_rates(s, fair=False) for s in range(6)], axis=0)
    assert false_raw > 1.5 * false_trained  # unscaled, the mean of its photos is favoured


def test_onnx_export_matches_torch_on_real_photos_and_identifies_alike(run, tiny_set, tmp_path):
    import onnx

    from reid.catalogue import embed_onnx, load
    from reid.config import load_config
    from reid.inference import embed_frame
    from reid.run import load_run

    model_file = tmp_path / "model.onnx"
    assert main(["export", "--run", str(run), "--out", str(model_file)]) == 0
    meta = {p.key: p.value for p in onnx.load(str(model_file)).metadata_props}
    cfg = load_config(run / "config.yaml")
    assert json.loads(meta["input_size"]) == [3, cfg.data.image_size, cfg.data.image_size]
    assert json.loads(meta["mean"]) == cfg.data.mean and json.loads(meta["std"]) == cfg.data.std
    assert int(meta["embedding_dim"]) == cfg.model.embedding_dim
    cat = tmp_path / "cat"
    assert main(["catalogue", "--run", str(run), "--out", str(cat)]) == 0
    manifest = load(cat)[0]
    photos = pd.DataFrame({"image": sorted(p.name for p in (tiny_set / "test_images").iterdir())[:6]})
    photos["path"] = [str(tiny_set / "test_images" / n) for n in photos.image]
    ours, ok = embed_onnx(model_file, photos, cfg, [], manifest)
    _, model, _ = load_run(run)
    theirs, _ = embed_frame(model.eval(), photos, cfg, [], __import__("torch").device("cpu"))
    assert ok.all() and np.abs(ours - theirs).max() <= 1e-4
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert main(["identify", "--catalogue", str(cat), str(tiny_set / "test_images"), "--out", str(a)]) == 0
    assert main(["identify", "--catalogue", str(cat), str(tiny_set / "test_images"), "--out", str(b), "--onnx",
                 str(model_file)]) == 0
    pa, pb = pd.read_csv(a), pd.read_csv(b)
    assert (pa.individual_id == pb.individual_id).mean() > 0.95 and np.allclose(pa.similarity, pb.similarity,
                                                                                 atol=1e-3)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_review_page_decisions_enroll_a_new_animal_end_to_end(run, tiny_set, tmp_path):
    import html
    import re

    cat = tmp_path / "cat"
    assert main(["catalogue", "--run", str(run), "--out", str(cat)]) == 0
    solution = pd.read_csv(tiny_set / "solution.csv")
    photo = tiny_set / "test_images" / solution[solution.individual_id == "new_individual"].image.iloc[0]
    page = tmp_path / "review.html"
    assert main(["identify", "--catalogue", str(cat), str(photo), "--html", str(page)]) == 0
    clicks = """<script>window.addEventListener("load", () => {
      const q = document.querySelector(".query");
      q.querySelector("input[value=__new__]").click();
      q.querySelector("input.newid").value = "seal_42";
      document.getElementById("save").click(); });</script>"""
    clicked = tmp_path / "clicked.html"
    clicked.write_text(page.read_text().replace("</pre>", "</pre>" + clicks, 1))
    from tests.conftest import browse

    dom = browse(clicked, "--dump-dom")
    saved = html.unescape(re.search(r'<pre id="saved">(.*?)</pre>', dom, re.S).group(1))
    assert saved == f"image,individual_id,species\n{photo.name},seal_42,\n"
    (tmp_path / "decisions.csv").write_text(saved)
    assert main(["enroll", "--catalogue", str(cat), "--csv", str(tmp_path / "decisions.csv"), "--images",
                 str(photo.parent)]) == 0
    assert main(["identify", "--catalogue", str(cat), str(photo), "--out", str(tmp_path / "again.csv")]) == 0
    assert pd.read_csv(tmp_path / "again.csv").query("rank == 1").individual_id.tolist() == ["seal_42"]

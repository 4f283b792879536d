import logging

import cv2
import numpy as np
import pandas as pd
import pytest

from reid.config import load_config
from reid.data import (
    DataError,
    collate,
    holdout_split,
    kfold_split,
    list_test,
    normalize_species,
    read_boxes,
    read_train,
    safe_paths,
    split_mask,
)

JPEG = cv2.imencode(".jpg", np.full((8, 8, 3), 120, np.uint8))[1].tobytes()  # the smallest real photo


def make_layout(root, rows, header="image,species,individual_id", files=None, newline="\n", bom=False):
    (root / "train_images").mkdir(parents=True, exist_ok=True)
    text = newline.join([header, *rows]) + newline
    (root / "train.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    for name in files if files is not None else [r.split(",")[0].strip('"') for r in rows]:
        (root / "train_images" / name).write_bytes(JPEG)
    return root


def test_reads_bom_crlf_quotes_and_extra_columns(tmp_path, caplog):
    rows = ['"a.jpg",beluga,"id1",x', "b.jpg, beluga ,id2,y"]
    make_layout(tmp_path, rows, header="image,species,individual_id,extra", newline="\r\n", bom=True)
    with caplog.at_level(logging.INFO):
        df = read_train(tmp_path)
    assert df.image.tolist() == ["a.jpg", "b.jpg"] and df.species.tolist() == ["beluga", "beluga"]
    assert "extra" in caplog.text


@pytest.mark.parametrize("rows, header, match", [
    (["a.jpg,beluga,id1"], "image,individual_id", r"lacks column\(s\) \['species'\]"),
    (["a.jpg,beluga,", "b.jpg,beluga,id2"], None, r"rows 2 have an empty individual_id"),
    (["a.jpg,beluga,id1", "a.jpg,beluga,id2"], None, r"rows 2, 3 list the same image twice with different indiv"),
    (["../etc/passwd,beluga,id1"], None, r"path separator or '\.\.'"),
    (["sub/a.jpg,beluga,id1"], None, r"path separator"),
])
def test_csv_errors_name_the_rows(tmp_path, rows, header, match):
    make_layout(tmp_path, rows, header=header or "image,species,individual_id", files=[])
    with pytest.raises(DataError, match=match):
        read_train(tmp_path)


def test_missing_image_files_error_or_skip(tmp_path, caplog):
    make_layout(tmp_path, ["a.jpg,beluga,id1", "b.jpg,beluga,id2"], files=["a.jpg"])
    with pytest.raises(DataError, match=r"rows 3 name image files that do not exist.*data.bad_images=skip"):
        read_train(tmp_path)
    assert read_train(tmp_path, bad_images="skip").image.tolist() == ["a.jpg"]


def test_exact_duplicate_rows_are_dropped_with_a_warning(tmp_path, caplog):
    make_layout(tmp_path, ["a.jpg,beluga,id1", "a.jpg,beluga,id1"], files=["a.jpg"])
    assert len(read_train(tmp_path)) == 1 and "duplicate" in caplog.text


def test_missing_train_csv(tmp_path):
    with pytest.raises(DataError, match="train.csv not found"):
        read_train(tmp_path)


def test_symlink_out_of_the_data_folder_is_refused(tmp_path):
    (tmp_path / "data" / "train_images").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"x")
    (tmp_path / "data" / "train_images" / "a.jpg").symlink_to(tmp_path / "secret.jpg")
    (tmp_path / "data" / "train_images" / "b.jpg").write_bytes(b"x")
    (tmp_path / "data" / "train_images" / "c.jpg").symlink_to(tmp_path / "data" / "train_images" / "b.jpg")
    folder = tmp_path / "data" / "train_images"
    assert safe_paths(folder, ["b.jpg", "c.jpg"]) == [str(folder / "b.jpg")] * 2  # a link inside is followed
    with pytest.raises(DataError, match="'a.jpg' resolves to .*secret.jpg, outside"):
        safe_paths(folder, ["b.jpg", "a.jpg"])


def test_species_normalization_reports_changes(caplog):
    s = pd.Series(["bottlenose_dolpin", "kiler_whale", "globis", "pilot_whale", "beluga", "sea_monster"])
    with caplog.at_level(logging.INFO):
        out = normalize_species(s)
    assert out.tolist() == ["bottlenose_dolphin", "killer_whale", "short_finned_pilot_whale",
                            "short_finned_pilot_whale", "beluga", "sea_monster"]
    assert "'kiler_whale' -> 'killer_whale'" in caplog.text and "sea_monster" in caplog.text


def long_tail_frame(n_ids=200, seed=0):
    rng = np.random.default_rng(seed)
    counts = np.minimum(rng.zipf(2.0, n_ids), 30)
    ids = np.repeat([f"id{i}" for i in range(n_ids)], counts)
    species = np.repeat(rng.choice(["beluga", "fin_whale", "gray_whale"], n_ids), counts)
    return pd.DataFrame({"image": [f"{i}.jpg" for i in range(len(ids))], "individual_id": ids, "species": species})


def test_holdout_mimics_test_new_individuals_absent_and_known_kept():
    df = long_tail_frame()
    val = holdout_split(df, 0.2, 0.25, seed=1)
    train_ids = set(df.individual_id[~val])
    val_df = df[val]
    new = ~val_df.individual_id.isin(train_ids)
    assert abs(val.mean() - 0.2) < 0.03
    assert abs(new.mean() - 0.25) < 0.05
    assert new.any() and (~new).any()
    assert df[~val].individual_id.nunique() + val_df.individual_id[new].nunique() == df.individual_id.nunique()
    assert (holdout_split(df, 0.2, 0.25, seed=1) == val).all()  # deterministic


@pytest.mark.parametrize("kind", ["kfold", "stratified", "group"])
def test_kfolds_partition_rows(kind):
    df = long_tail_frame()
    masks = [kfold_split(df, kind, 4, f, seed=0) for f in range(4)]
    assert (np.sum(masks, axis=0) == 1).all()  # every row in exactly one validation fold
    if kind == "group":
        for m in masks:
            assert not set(df.individual_id[m]) & set(df.individual_id[~m])
    if kind == "stratified":
        share = [df.species[m].value_counts(normalize=True).sort_index() for m in masks]
        assert np.abs(share[0] - share[1]).max() < 0.05


def test_split_mask_follows_config():
    df = long_tail_frame()
    cfg = load_config(None, ["split.kind=group", "split.folds=3", "split.fold=2"])
    assert (split_mask(df, cfg.split) == kfold_split(df, "group", 3, 2, 0)).all()


def test_list_test_and_boxes(tmp_path):
    (tmp_path / "test_images").mkdir()
    with pytest.raises(DataError, match="empty"):
        list_test(tmp_path)
    (tmp_path / "test_images" / "q.jpg").write_bytes(b"x")
    assert list_test(tmp_path).image.tolist() == ["q.jpg"]
    (tmp_path / "crops.csv").write_text("image,x1,y1,x2,y2\nq.jpg,1,2,30,40\nr.jpg,a,2,3,4\n")
    (boxes,) = read_boxes(tmp_path, ["crops.csv", "absent.csv"])
    assert boxes == {"q.jpg": (1.0, 2.0, 30.0, 40.0)}


def test_collate_pads_different_sizes_and_keeps_ids():
    import torch

    batch = [(torch.ones(3, 4, 6), 1, 0), (torch.ones(3, 5, 3), 2, 7)]
    out = collate(batch)
    assert out["images"].shape == (2, 3, 5, 6)
    assert out["images"][0, :, 4:, :].abs().sum() == 0 and out["images"][1, :, :, 3:].abs().sum() == 0
    assert out["labels"].tolist() == [1, 2] and out["indices"].tolist() == [0, 7]


def test_heldout_set_is_a_valid_layout_with_new_individuals_and_never_overwrites(tmp_path, load_script):
    heldout = load_script("heldout")
    photos = heldout.write(tmp_path, individuals=8, seed=1, jobs=1)
    train = read_train(tmp_path)
    assert set(train.image) == set(photos.image[photos.part == "train"]) and train.individual_id.nunique() == 8
    solution = pd.read_csv(tmp_path / "solution.csv")
    new = ~solution.individual_id.isin(train.individual_id)
    assert new.any() and (solution.individual_id[new] == "new_individual").all()
    left, right = heldout.coat(1, 0, 0, "whale_shark"), heldout.coat(1, 0, 1, "whale_shark")
    assert np.abs(left - right).mean() > 5  # the two body sides carry different patterns
    assert np.array_equal(heldout.render(1, 0, "plains_zebra", "a.jpg"), heldout.render(1, 0, "plains_zebra", "a.jpg"))
    with pytest.raises(SystemExit, match="already exists"):
        heldout.write(tmp_path, individuals=8, seed=1, jobs=1)


def test_synth_at_kaggle_shape_uses_the_real_labels_and_tail():
    """`reid synth --species kaggle --tail 2.1`: the real set's species labels (misspellings too, which the data layer
    folds to 26 species) and its long tail, planned without drawing a photo."""
    from reid.data import KNOWN_SPECIES
    from reid.synth import KAGGLE_SPECIES, SPECIES, SynthSpec, plan

    people, photos = plan(SynthSpec(individuals=3000, species="kaggle", tail=2.1, max_photos=400, seed=1))
    labels = pd.Series([people[i].label for i in photos.individual[photos.part == "train"]])
    assert set(labels) <= set(KAGGLE_SPECIES) and labels.nunique() >= 25
    assert {"bottlenose_dolpin", "kiler_whale", "globis", "pilot_whale"} <= set(labels)
    assert set(normalize_species(labels)) <= KNOWN_SPECIES
    assert {p.species for p in people} <= set(SPECIES)  # each drawn as one of the four body forms
    per_individual = photos[photos.part == "train"].individual.value_counts()
    assert 0.55 < (per_individual == 1).mean() < 0.7 and per_individual.max() > 100
    assert 2.5 < len(labels) / len(per_individual) < 4.5  # Kaggle: 51,033 photos of 15,587 individuals, 3.3 each
    four, _ = plan(SynthSpec(individuals=50, seed=1))
    assert {p.label for p in four} <= set(SPECIES)

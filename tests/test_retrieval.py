import numpy as np
import pytest

from reid import retrieval as r
from reid.retrieval import NEW


def test_map_at_5_hand_made():
    preds = [["a", "b", "c", "d", "e"], ["x", "a", "b", "c", "d"], ["x", "y", "z", "w", "a"], ["q"] * 5]
    assert r.map_at_5(preds, ["a", "a", "a", "a"]) == pytest.approx((1 + 0.5 + 0.2 + 0) / 4)
    assert r.map_at_5([["a", "a", "b", "c", "d"]], ["b"]) == pytest.approx(1 / 3)


def test_search_matches_numpy():
    rng = np.random.default_rng(0)
    g, q = r.normalize(rng.normal(size=(50, 8))), r.normalize(rng.normal(size=(7, 8)))
    scores, idx = r.search(q, g, 5, batch=3)
    expect = np.argsort(-(q @ g.T), axis=1)[:, :5]
    assert (idx == expect).all()
    assert np.allclose(scores, np.take_along_axis(q @ g.T, expect, 1), atol=1e-5)


def test_search_with_k_above_gallery_pads():
    g = r.normalize(np.eye(3, 4))
    scores, idx = r.search(g[:1], g, 5)
    assert idx[0, 3:].tolist() == [-1, -1] and np.isinf(scores[0, 3:]).all()


def test_rank_individuals_keeps_best_photo_per_individual():
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]])
    indices = np.array([[0, 1, 2, 3, 4, 5, 6]])
    labels = np.array(["a", "a", "b", "c", "b", "d", "e"])
    ids, sims = r.rank_individuals(scores, indices, labels)
    assert ids[0].tolist() == ["a", "b", "c", "d", "e"]
    assert sims[0].tolist() == pytest.approx([0.9, 0.7, 0.6, 0.4, 0.3])
    # a gallery smaller than k: the search pads with -1, and unfilled places stay empty
    ids, sims = r.rank_individuals(np.array([[0.9, 0.8, -np.inf]]), np.array([[1, 0, -1]]), labels)
    assert ids[0].tolist() == ["a", "", "", "", ""] and sims[0, 0] == pytest.approx(0.9) and np.isinf(sims[0, 1:]).all()


def test_decide_inserts_new_individual_at_first_rank_below_threshold():
    ids = np.array([["a", "b", "c", "d", "e"], ["a", "b", "c", "d", "e"], ["a", "b", "c", "d", "e"]], dtype=object)
    sims = np.array([[0.9, 0.8, 0.4, 0.3, 0.2], [0.3, 0.2, 0.1, 0.0, -0.1], [0.9, 0.9, 0.9, 0.9, 0.9]])
    out = r.decide(ids, sims, 0.5)
    assert out == [["a", "b", NEW, "c", "d"], [NEW, "a", "b", "c", "d"], ["a", "b", "c", "d", "e"]]
    assert r.decide(ids, sims, [0.95, 0.25, 0.0])[:2] == [[NEW, "a", "b", "c", "d"], ["a", NEW, "b", "c", "d"]]


def test_decide_pads_short_candidate_lists_with_unique_fillers():
    ids = np.array([["a", "", "", "", ""]], dtype=object)
    sims = np.array([[0.9, -np.inf, -np.inf, -np.inf, -np.inf]])
    out = r.decide(ids, sims, 0.5, fillers=["a", "z", "y", "x"])
    assert out == [["a", NEW, "z", "y", "x"]]


def test_threshold_curve_equals_decide_then_score():
    rng = np.random.default_rng(1)
    ids = np.array([list("abcde"), list("bcdef"), list("cdefg"), list("abcde")], dtype=object)
    sims = -np.sort(-rng.uniform(0, 1, (4, 5)), axis=1)
    truths = ["c", NEW, "z", "a"]
    grid = np.linspace(-0.1, 1.1, 25, dtype=np.float32)
    curve = r.threshold_curve(ids, sims, truths, grid)
    brute = [r.map_at_5(r.decide(ids, sims, t), truths) for t in grid]
    assert np.allclose(curve, brute)


def test_tune_threshold_finds_the_separating_value():
    ids = np.array([list("abcde")] * 4, dtype=object)
    sims = np.array([[0.9, 0.1, 0.0, 0.0, 0.0], [0.8, 0.1, 0, 0, 0], [0.3, 0.2, 0, 0, 0], [0.2, 0.1, 0, 0, 0]])
    tuned = r.tune_threshold(ids, sims, ["a", "a", NEW, NEW])
    assert tuned["map5"] == pytest.approx(1.0) and 0.3 < tuned["threshold"] <= 0.8


def test_individual_gallery_means():
    emb = np.array([[1, 0], [0, 1], [1, 0]], np.float32)
    g, labels = r.individual_gallery(emb, np.array(["x", "x", "y"]))
    assert labels.tolist() == ["x", "y"]
    assert np.allclose(g, [[2**-0.5, 2**-0.5], [1, 0]])


def test_share_policy_sets_new_first_for_the_target_share():
    sims = np.sort(np.random.default_rng(0).uniform(0, 1, (100, 5)), axis=1)[:, ::-1]
    ids = np.array([list("abcde")] * 100, dtype=object)
    th = r.policy_thresholds("share", sims, {"threshold": 0.0}, share=0.3)
    preds = r.decide(ids, sims, th)
    assert np.mean([p[0] == NEW for p in preds]) == pytest.approx(0.3, abs=0.011)
    th_val = r.policy_thresholds("share", sims, {"threshold": 0.0, "new_first_share": 0.5})
    assert np.mean(sims[:, 0] < th_val) == pytest.approx(0.5, abs=0.011)


def test_species_policy_uses_each_species_threshold_with_fallback():
    sims = np.array([[0.6, 0, 0, 0, 0], [0.6, 0, 0, 0, 0], [0.6, 0, 0, 0, 0]])
    tuned = {"threshold": 0.5, "per_species": {"beluga": 0.7, "fin_whale": 0.4}}
    th = r.policy_thresholds("species", sims, tuned, np.array(["beluga", "fin_whale", "gray_whale"]))
    assert th.tolist() == pytest.approx([0.7, 0.4, 0.5])


def test_tune_by_group_separates_groups_and_keeps_small_ones_at_fallback():
    ids = np.array([list("abcde")] * 8, dtype=object)
    # group x: known matches at 0.9, new ones at 0.6; group y: known at 0.5, new at 0.2
    top = [0.9, 0.9, 0.6, 0.6, 0.5, 0.5, 0.2, 0.2]
    sims = np.array([[t, 0, 0, 0, 0] for t in top])
    truths = ["a", "a", NEW, NEW, "a", "a", NEW, NEW]
    groups = np.array(["x"] * 4 + ["y"] * 4)
    per = r.tune_by_group(ids, sims, truths, groups, fallback=0.0, min_queries=4)
    assert 0.6 < per["x"] <= 0.9 and 0.2 < per["y"] <= 0.5
    assert r.tune_by_group(ids, sims, truths, groups, fallback=0.33, min_queries=5) == {"x": 0.33, "y": 0.33}


def test_query_expansion_pulls_queries_toward_their_neighbours():
    gallery = r.normalize(np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 1, 0]], np.float32))
    q = r.normalize(np.array([[0.8, 0.6, 0]], np.float32))
    scores, idx = r.search(q, gallery, 3)
    expanded = r.expand_queries(q, gallery, scores, idx, 2)
    assert expanded @ gallery[0] > q @ gallery[0] and np.isclose(np.linalg.norm(expanded), 1)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_find_clustered_neighbours(kind):
    rng = np.random.default_rng(0)
    centres = r.normalize(rng.normal(size=(50, 16)))
    gallery = r.normalize(np.repeat(centres, 40, axis=0) + 0.05 * rng.normal(size=(2000, 16)))
    _, exact = r.search(centres, gallery, 5)
    _, approx = r.search(centres, gallery, 5, kind=kind)
    recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.9


def test_k_reciprocal_rerank_promotes_mutual_neighbours():
    # the query's plain nearest photo (d) belongs to another dense group; its own group G is mutual with it
    rng = np.random.default_rng(0)
    e = np.eye(8, dtype=np.float32)
    group = r.normalize(e[0] + 0.03 * rng.normal(size=(4, 8)).astype(np.float32))
    hub = r.normalize(e[0] + 0.33 * e[1] + 0.5 * e[2] + 0.03 * rng.normal(size=(6, 8)).astype(np.float32))
    d = r.normalize((e[0] + 0.33 * e[1] + 0.3 * e[2])[None])
    query = r.normalize((e[0] + 0.33 * e[1] + 0.08 * e[2])[None])
    gallery = np.concatenate([group, hub, d])
    scores, idx = r.search(query, gallery, 11)
    assert idx[0, 0] == 10
    new_scores, new_idx = r.k_reciprocal_rerank(query, gallery, scores, idx, k1=5, lam=0.9)
    assert set(new_idx[0, :4].tolist()) == {0, 1, 2, 3} and (np.diff(new_scores[0]) <= 1e-6).all()
    same_scores, same_idx = r.k_reciprocal_rerank(query, gallery, scores, idx, k1=5, lam=0.0)
    assert (same_idx == idx).all() and np.allclose(same_scores, scores)


def _unit(cos: float) -> list[float]:
    return [cos, float(np.sqrt(1 - cos ** 2))]


def test_blend_centres_hand_made():
    q = np.array([[1.0, 0.0]], np.float32)
    ids, sims = np.array([["a", "b", "d"]], dtype=object), np.array([[0.9, 0.8, 0.85]], np.float32)
    # "b" has two sub-centres (the better counts), "c" has a centre but no photo among the candidates, "d" no centre
    centres = np.array([_unit(0.2), _unit(0.95), _unit(0.5), _unit(0.99)], np.float32)
    centre_ids = np.array(["a", "b", "b", "c"], dtype=object)
    out_ids, out_sims = r.blend_centres(q, ids, sims, centres, centre_ids, 0.5, k=4)
    # a: (0.9 + 0.2) / 2; b: (0.8 + 0.95) / 2; c: photo floor 0.8 with 0.99; d: no centre, keeps 0.85
    assert out_ids[0, :4].tolist() == ["c", "b", "d", "a"] and out_ids[0, 4] == ""
    assert out_sims[0, :4].tolist() == pytest.approx([0.895, 0.875, 0.85, 0.55], abs=1e-5)
    same_ids, same_sims = r.blend_centres(q, ids, sims, centres, centre_ids, 0.0, k=4)
    assert same_ids[0, :3].tolist() == ["a", "d", "b"] and same_sims[0, :3].tolist() == pytest.approx([0.9, 0.85, 0.8])


def test_blend_centres_equals_the_dense_definition():
    rng = np.random.default_rng(0)
    gallery, queries = (r.normalize(rng.normal(size=(n, 8)).astype(np.float32)) for n in (60, 30))
    labels = np.array([f"i{j % 12}" for j in range(60)], dtype=object)
    centres, centre_ids = r.normalize(rng.normal(size=(10, 8)).astype(np.float32)), np.array(labels[:10])
    ids, sims = r.rank_individuals(*r.search(queries, gallery, 60), labels, top=12)  # every individual, every photo
    out_ids, out_sims = r.blend_centres(queries, ids, sims, centres, centre_ids, 0.3, k=10)
    names = [f"i{j}" for j in range(12)]
    photo = np.stack([(queries @ gallery[labels == i].T).max(axis=1) for i in names], axis=1)
    centre = np.concatenate([queries @ centres.T, photo[:, 10:]], axis=1)  # i10 and i11 have no centre
    score = 0.7 * photo + 0.3 * centre
    best = np.argsort(-score, axis=1)[:, :5]
    assert (out_ids == np.array(names, dtype=object)[best]).all()
    assert np.allclose(out_sims, np.take_along_axis(score, best, 1), atol=1e-6)


def test_candidates_with_centres_fix_a_misleading_photo():
    from types import SimpleNamespace

    from reid.retrieval import tune_policies

    # the query's nearest photo is of "b" (0.8 against 0.6), but the class centre of "a" is far the nearer one
    query = np.array([[1.0, 0.0, 0.0]], np.float32)
    gallery, labels = np.array([[0.6, 0.8, 0.0], [0.8, 0.0, 0.6]], np.float32), np.array(["a", "b"], dtype=object)
    centres = np.array([[0.95, np.sqrt(1 - 0.95 ** 2), 0.0], [0.1, 0.0, np.sqrt(0.99)]], np.float32)
    pcfg = SimpleNamespace(k=2, gallery="photo", index="flat", centre_weight=0.0, query_expansion=0, rerank=False,
                           policy="similarity")
    assert tune_policies(query, gallery, labels, ["a"], pcfg, {}, (centres, labels))["map5"] == 0.5
    pcfg.centre_weight = 0.5
    assert tune_policies(query, gallery, labels, ["a"], pcfg, {}, (centres, labels))["map5"] == 1.0

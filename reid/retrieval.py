"""Nearest neighbours with FAISS, best similarity per individual, the new_individual decision and its threshold.

Plain array contracts: `search(queries, gallery, k) -> (scores, indices)`, `rank_individuals(...) -> (ids, sims)`
with five candidates per query, `decide(ids, sims, threshold) -> five predictions per query`.
"""

from __future__ import annotations

import logging

import numpy as np

from .errors import NEW, ReidError

log = logging.getLogger(__name__)
logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every CPU feature it lacks

TOP = 5


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def among(values, wanted) -> np.ndarray:
    """Which of `values` are in `wanted`, by hashing: np.isin sorts strings (seconds for Kaggle's ids)."""
    wanted = set(wanted)
    return np.fromiter((v in wanted for v in values), dtype=bool, count=len(values))


def import_faiss():
    """FAISS, imported here (start-up and `reid --help` must not pay for it), from faiss-cpu or faiss-gpu: the two
    provide the same module, so reid's `cpu` and `gpu` extras each install one."""
    try:
        import faiss
    except ImportError as err:
        raise ReidError("faiss is not installed: pip install -e '.[cpu]' (or '.[gpu]' on a CUDA machine)") from err
    return faiss


def build_index(gallery: np.ndarray, kind: str = "flat", use_gpu: bool = True):
    """A FAISS inner-product index over the gallery: exact `flat`, or `hnsw` / `ivf` for million-photo catalogues.
    Flat and IVF move to the GPU when faiss-gpu sees one; HNSW stays on the CPU (FAISS has no GPU HNSW)."""
    faiss = import_faiss()
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    n, d = gallery.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = 80, 128
    elif kind == "ivf":
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))  # FAISS wants >= 39 training points per list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(gallery[np.random.default_rng(0).permutation(n)[: 256 * nlist]])
        index.nprobe = min(nlist, 32)
    else:
        index = faiss.IndexFlatIP(d)
    if use_gpu and kind != "hnsw" and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(gallery)
    return index


GPU_MAX_K = 2048  # FAISS GPU indexes return at most this many neighbours


def search(queries: np.ndarray, gallery: np.ndarray, k: int, batch: int = 4096, kind: str = "flat",
           use_gpu: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product (cosine for normalized vectors), queries in batches to bound memory.
    Returns (scores, indices), both (Q, k); missing neighbours have index -1 and score -inf."""
    index = build_index(gallery, kind, use_gpu)
    k_eff = min(k, len(gallery), GPU_MAX_K if "Gpu" in type(index).__name__ else k)
    scores = np.full((len(queries), k), -np.inf, np.float32)
    indices = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(queries), batch):
        q = np.ascontiguousarray(queries[start: start + batch], dtype=np.float32)
        scores[start: start + len(q), :k_eff], indices[start: start + len(q), :k_eff] = index.search(q, k_eff)
    return scores, np.where(indices < 0, -1, indices)


def rank_individuals(scores: np.ndarray, indices: np.ndarray, labels: np.ndarray, top: int = TOP
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The `top` best individuals per query by their best photo's similarity. Returns (ids, sims), (Q, top);
    unfilled places hold '' and -inf."""
    ids = np.full((len(scores), top), "", dtype=object)
    sims = np.full((len(scores), top), -np.inf, np.float32)
    for q in range(len(scores)):
        seen: list = []
        for s, i in zip(scores[q], indices[q], strict=True):
            if i < 0:
                break
            if labels[i] not in seen:
                seen.append(labels[i])
                ids[q, len(seen) - 1], sims[q, len(seen) - 1] = labels[i], s
                if len(seen) == top:
                    break
    return ids, sims


def new_position(sims: np.ndarray, threshold) -> np.ndarray:
    """Where new_individual goes: before the first candidate whose similarity is below the threshold."""
    return (np.asarray(sims, np.float32) >= np.asarray(threshold, np.float32).reshape(-1, 1)).sum(axis=1)


def decide(ids: np.ndarray, sims: np.ndarray, threshold, fillers: list[str] = ()) -> list[list[str]]:
    """Five unique predictions per query: the candidates with new_individual inserted at its position.
    `threshold` is one number or one per query; `fillers` pad queries with fewer than five candidates."""
    pos = new_position(sims, np.broadcast_to(np.asarray(threshold, np.float32), (len(ids),)))
    out = []
    for row, p in zip(ids, pos, strict=True):
        known = [x for x in row if x]
        pred = known[:p] + [NEW] + known[p:]
        pred += [f for f in fillers if f not in pred]
        out.append(pred[:TOP])
    return out


def map_at_5(predictions: list[list[str]], truths: list[str]) -> float:
    """Mean over queries of 1/rank of the first correct prediction among the first five, 0 if absent."""
    return map_at_5_split(predictions, truths)["map5"] if len(truths) else 0.0


def map_at_5_split(predictions: list[list[str]], truths: list[str]) -> dict[str, float]:
    """MAP@5 on all queries, on those whose answer is a known individual, and on the new ones."""
    is_new = np.asarray(truths, dtype=object) == NEW
    scores = np.array([next((1.0 / r for r, p in enumerate(pred[:TOP], 1) if p == t), 0.0)
                       for pred, t in zip(predictions, truths, strict=True)])
    part = lambda m: float(scores[m].mean()) if m.any() else float("nan")  # noqa: E731
    return {"map5": part(np.ones(len(truths), bool)), "map5_known": part(~is_new), "map5_new": part(is_new)}


def threshold_curve(ids: np.ndarray, sims: np.ndarray, truths: list[str], thresholds: np.ndarray) -> np.ndarray:
    """MAP@5 of `decide` at each threshold, computed for all thresholds at once."""
    truths = np.asarray(truths, dtype=object)
    is_new = truths == NEW
    hit = ids == truths[:, None]
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), TOP + 1)  # 0-based place among the candidates
    sims = np.asarray(sims, np.float32)
    pos = (sims[None, :, :] >= np.asarray(thresholds, np.float32)[:, None, None]).sum(axis=2)  # (T, Q)
    known_score = np.where(rank < pos, 1.0 / (rank + 1), np.where(rank + 1 < TOP, 1.0 / (rank + 2), 0.0))
    new_score = np.where(pos < TOP, 1.0 / (pos + 1), 0.0)
    return np.where(is_new[None, :], new_score, known_score).mean(axis=1)


def candidate_thresholds(sims: np.ndarray, n: int = 401) -> np.ndarray:
    """Every similarity where MAP@5 can change (all of them for small sets, else quantiles), plus one value
    below and one above all of them."""
    sims = np.asarray(sims, np.float32)  # the same precision as the comparisons in new_position
    values = np.unique(sims[np.isfinite(sims)])
    if not len(values):
        return np.array([0.0], np.float32)
    if len(values) > n:
        values = np.unique(np.quantile(values, np.linspace(0, 1, n)))
    return np.concatenate([[values[0] - 1e-3], values, [values[-1] + 1e-3]]).astype(np.float32)


def tune_threshold(ids: np.ndarray, sims: np.ndarray, truths: list[str]) -> dict:
    """The threshold with the best MAP@5 on a validation set (the middle of the best plateau)."""
    grid = candidate_thresholds(sims)
    curve = threshold_curve(ids, sims, truths, grid)
    lo, hi = _longest_run(curve >= curve.max() - 1e-9)
    # MAP@5 only changes at similarity values: the whole interval (grid[lo-1], grid[hi]] scores the best, and
    # its middle is the choice least sensitive to a shift of similarities between validation and test
    threshold = (float(grid[lo - 1]) + float(grid[hi])) / 2 if lo > 0 else float(grid[hi])
    return {"threshold": float(threshold), "map5": float(curve[hi]), "grid": grid.tolist(), "curve": curve.tolist()}


def _longest_run(mask: np.ndarray) -> tuple[int, int]:
    """First and last index of the longest run of True (the first such run on a tie)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(mask, np.int8), [0]])))
    starts, ends = edges[::2], edges[1::2] - 1
    if not len(starts):
        return 0, 0
    best = int(np.argmax(ends - starts))
    return int(starts[best]), int(ends[best])


def individual_gallery(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One vector per individual: the normalized mean of its photos' normalized embeddings."""
    uniq, inverse = np.unique(labels, return_inverse=True)
    sums = np.zeros((len(uniq), embeddings.shape[1]), np.float64)
    np.add.at(sums, inverse, normalize(embeddings))
    return normalize(sums), uniq


def share_threshold(top1: np.ndarray, share: float) -> float:
    """The threshold below which `share` of the queries' best similarities fall: those get new_individual first.
    The first-place Happywhale solution set its threshold this way on the test set."""
    top1 = top1[np.isfinite(top1)]
    return float(np.quantile(top1, share)) if len(top1) else 0.0


def tune_by_group(ids: np.ndarray, sims: np.ndarray, truths: list[str], groups: np.ndarray, fallback: float,
                  min_queries: int = 20) -> dict[str, float]:
    """One tuned threshold per group (e.g. the species of the best candidate); groups with fewer than
    `min_queries` validation queries keep `fallback`, so a few photos cannot set a threshold."""
    out = {}
    truths = np.asarray(truths, dtype=object)
    for g in np.unique(groups):
        mask = groups == g
        out[str(g)] = tune_threshold(ids[mask], sims[mask], list(truths[mask]))["threshold"] \
            if mask.sum() >= min_queries else fallback
    return out


def policy_thresholds(policy: str, sims: np.ndarray, tuned: dict, groups: np.ndarray | None = None,
                      share: float | None = None) -> np.ndarray:
    """Per-query thresholds for a policy: `similarity` (one tuned value), `share` (a target share of
    new_individual-first answers among these queries) or `species` (a tuned value per predicted species)."""
    n = len(sims)
    if policy == "share":
        target = tuned.get("new_first_share", 0.25) if share is None else share
        return np.full(n, share_threshold(sims[:, 0], target), np.float32)
    if policy == "species" and groups is not None and tuned.get("per_species"):
        per = tuned["per_species"]
        return np.array([per.get(str(g), tuned["threshold"]) for g in groups], np.float32)
    return np.full(n, tuned["threshold"], np.float32)


def expand_queries(queries: np.ndarray, gallery: np.ndarray, scores: np.ndarray, indices: np.ndarray, n: int
                   ) -> np.ndarray:
    """Average query expansion: each query plus its top-n gallery neighbours weighted by similarity."""
    top = indices[:, :n]
    weights = np.where(top >= 0, np.maximum(scores[:, :n], 0), 0)[..., None]
    return normalize(queries + (gallery[np.maximum(top, 0)] * weights).sum(axis=1))


def k_reciprocal_rerank(queries: np.ndarray, gallery: np.ndarray, scores: np.ndarray, indices: np.ndarray,
                        k1: int = 20, lam: float = 0.3, index: str = "flat") -> tuple[np.ndarray, np.ndarray]:
    """Re-score each query's candidates as (1 - lam) * cosine + lam * Jaccard overlap of their k-reciprocal
    neighbour sets (Zhong et al. 2017, on top-k1 lists over gallery and queries together), then re-sort."""
    nodes = np.concatenate([gallery, queries])
    _, nn = search(nodes, nodes, k1 + 1, kind=index)
    near = [set(row[row >= 0].tolist()) for row in nn]
    recip = [{j for j in near[i] if i in near[j]} for i in range(len(nodes))]
    new = scores.copy()
    for q in range(len(queries)):
        rq = recip[len(gallery) + q]
        for c, g in enumerate(indices[q]):
            if g >= 0:
                rg = recip[g]
                new[q, c] = (1 - lam) * scores[q, c] + lam * len(rq & rg) / max(1, len(rq | rg))
    order = np.argsort(-new, axis=1, kind="stable")
    return np.take_along_axis(new, order, 1), np.take_along_axis(indices, order, 1)


def blend_centres(queries: np.ndarray, ids: np.ndarray, sims: np.ndarray, centres: np.ndarray, centre_ids: np.ndarray,
                  weight: float, k: int = 50, index: str = "flat", scale: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Re-rank each query's candidate individuals by (1 - weight) * photo similarity + weight * cosine to the
    individual's trained class centre (the ArcFace weights; sub-centres: the best one). A candidate missing from
    one of the two top-k lists takes that list's lowest score for the query; one without a centre (not in the
    training split) keeps its photo similarity; `scale` multiplies each centre's cosines (stand-in centres, brought
    to the trained centres' level). Returns the top five (ids, sims)."""
    c_scores, c_idx = search(queries, centres, k, kind=index)
    if scale is not None:
        c_scores = np.where(c_idx >= 0, c_scores * scale[np.maximum(c_idx, 0)], c_scores)
        order = np.argsort(-c_scores, axis=1, kind="stable")
        c_scores, c_idx = np.take_along_axis(c_scores, order, 1), np.take_along_axis(c_idx, order, 1)
    has_centre = set(centre_ids.tolist())
    out_ids, out_sims = np.full((len(ids), TOP), "", dtype=object), np.full((len(ids), TOP), -np.inf, np.float32)
    for q in range(len(ids)):
        photo = {i: float(s) for i, s in zip(ids[q], sims[q], strict=True) if i}
        centre: dict = {}
        for s, j in zip(c_scores[q], c_idx[q], strict=True):
            if j >= 0:
                centre.setdefault(centre_ids[j], float(s))  # sorted: the first is an individual's best sub-centre
        p_low, c_low = min(photo.values(), default=-1.0), min(centre.values(), default=-1.0)
        score = {i: (1 - weight) * photo.get(i, p_low)
                 + weight * (centre.get(i, c_low) if i in has_centre else photo.get(i, p_low)) for i in photo | centre}
        best = sorted(score.items(), key=lambda kv: -kv[1])[:TOP]
        out_ids[q, : len(best)], out_sims[q, : len(best)] = [i for i, _ in best], [s for _, s in best]
    return out_ids, out_sims


def stand_in_centres(emb: np.ndarray, labels: np.ndarray, centres: np.ndarray, centre_ids: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class centres for every individual: the trained ones, and for an individual without one (seen only in
    validation, or enrolled later) the normalised mean of its photos' embeddings. Its cosines are scaled by how the
    trained individuals' centres relate to their own means: the ratio of a photo's cosine to its centre to its cosine
    to the mean of the individual's other photos, over the trained individuals with two photos or more. So it is
    neither favoured nor buried. Returns (vectors, ids, score scale per row)."""
    missing = np.setdiff1d(np.unique(labels), centre_ids)
    scale = np.ones(len(centres), np.float32)
    if not len(missing):
        return centres, centre_ids, scale
    # per photo, vectorised (Kaggle has 15,587 individuals): its cosine to its individual's centre and to the
    # normalised sum of the individual's other photos; then the mean per individual, then over individuals
    uniq, inv = np.unique(labels, return_inverse=True)
    row = {c: i for i, c in enumerate(centre_ids)}
    rows = np.array([row.get(c, -1) for c in uniq])
    counts = np.bincount(inv, minlength=len(uniq))
    sums = np.zeros((len(uniq), emb.shape[1]), np.float64)
    np.add.at(sums, inv, emb)
    others = sums[inv] - emb
    to_mean = (emb * others).sum(1) / np.maximum(np.linalg.norm(others, axis=1), 1e-12)
    to_centre = (emb * centres[np.maximum(rows[inv], 0)]).sum(1)
    used = (rows >= 0) & (counts > 1)
    per = lambda x: np.bincount(inv, weights=x, minlength=len(uniq))[used] / counts[used]  # noqa: E731
    a = float(np.clip(per(to_centre).mean() / max(per(to_mean).mean(), 1e-6), 0.0, 1.0)) if used.any() else 1.0
    keep = among(labels, missing)
    means, ids = individual_gallery(emb[keep], labels[keep])
    vectors = np.concatenate([centres, means]).astype(np.float32)
    return vectors, np.concatenate([centre_ids, ids]), np.concatenate([scale, np.full(len(ids), a, np.float32)])


def candidates(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray, k: int = 50, index: str = "flat",
               query_expansion: int = 0, rerank: bool = False, centres=None, centre_weight: float = 0.0
               ) -> tuple[np.ndarray, np.ndarray]:
    """Top individuals per query (ids, sims) by their best gallery photo, optionally after query expansion and
    k-reciprocal re-ranking, and blended with the class centres (`centres`: (vectors, ids)) at `centre_weight`."""
    scores, indices = search(queries, gallery, k, kind=index)
    if query_expansion:
        queries = expand_queries(queries, gallery, scores, indices, query_expansion)
        scores, indices = search(queries, gallery, k, kind=index)
    if rerank:
        scores, indices = k_reciprocal_rerank(queries, gallery, scores, indices, index=index)
    blend = centres is not None and bool(centre_weight)
    ids, sims = rank_individuals(scores, indices, labels, top=k if blend else TOP)
    ids, sims = widen(queries, gallery, labels, ids, sims, k, index)
    if not blend:
        return ids, sims
    vectors, centre_ids, *scale = centres  # (vectors, ids[, score scale per centre])
    return blend_centres(queries, ids, sims, vectors, centre_ids, centre_weight, k, index, *scale)


def widen(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray, ids: np.ndarray, sims: np.ndarray, k: int,
          index: str = "flat") -> tuple[np.ndarray, np.ndarray]:
    """Search again, four times deeper each time, for the queries whose top-k photos show fewer than five distinct
    individuals (one animal with hundreds of photos can fill them), until five are found or the gallery is done."""
    need = min(TOP, len(np.unique(labels)), ids.shape[1])
    short = np.flatnonzero((ids[:, :need] == "").any(axis=1))
    while len(short) and k < len(gallery):
        k = min(len(gallery), 4 * k)
        scores, indices = search(queries[short], gallery, k, kind=index)
        ids[short], sims[short] = rank_individuals(scores, indices, labels, top=ids.shape[1])
        short = short[(ids[short, :need] == "").any(axis=1)]
    return ids, sims


def tune_policies(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray, truths: list[str], pcfg,
                  species_of: dict[str, str], centres: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Validation MAP@5 under each new_individual policy, with what predict needs to apply them to test photos:
    the tuned threshold and its curve, the new-first share it gives, per-species thresholds, and whether query
    expansion helped. `centres`: the class centres and their individual ids, blended in at predict.centre_weight."""
    kw = {"k": pcfg.k, "index": pcfg.index, "centres": centres,
          "centre_weight": pcfg.centre_weight}
    ids, sims = candidates(queries, gallery, labels, **kw)
    tuned = tune_threshold(ids, sims, truths)
    for switch, value in (("query_expansion", pcfg.query_expansion), ("rerank", pcfg.rerank)):
        if not value:
            continue
        kw[switch] = value
        alt_ids, alt_sims = candidates(queries, gallery, labels, **kw)
        alt = tune_threshold(alt_ids, alt_sims, truths)
        helps = alt["map5"] > tuned["map5"]
        log.info("%s: validation MAP@5 %.4f against %.4f without: %s", switch, alt["map5"], tuned["map5"],
                 "kept" if helps else "turned off")
        if helps:
            ids, sims, tuned = alt_ids, alt_sims, {**alt, **{k: v for k, v in tuned.items() if k.endswith("_helps")}}
        else:
            kw.pop(switch)
        tuned[f"{switch}_helps"] = helps
    pos = new_position(sims, tuned["threshold"])
    tuned["new_first_share"] = float(np.mean(pos == 0))
    groups = np.array([species_of.get(i, "") for i in ids[:, 0]])
    tuned["per_species"] = tune_by_group(ids, sims, truths, groups, tuned["threshold"])
    for policy in ("similarity", "share", "species"):
        split = map_at_5_split(decide(ids, sims, policy_thresholds(
            policy, sims, tuned, groups)), truths)
        tuned[f"map5_{policy}"] = split["map5"]
        if policy == pcfg.policy:
            tuned.update(map5_known=split["map5_known"], map5_new=split["map5_new"])
    tuned["map5"] = tuned[f"map5_{pcfg.policy}"]
    return tuned


def search_settings(pcfg, centres_used: bool) -> dict:
    """The search settings a tuned threshold holds for, as threshold.json records them: the centre weight applied
    and the views the embeddings were averaged over (sides, none given is the one side; crops)."""
    return {"centre_weight": pcfg.centre_weight if centres_used else 0.0, "tta_scales": list(pcfg.tta_scales) or [1.0],
            "five_crop": pcfg.five_crop}

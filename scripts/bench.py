"""Benchmarks, each against the plain alternative run side by side in this process. Appends to OUT/results.json
(default runs/bench/results.json, never a tracked file); the README's table is updated by hand from it.

    python scripts/bench.py [--only data,loader,layout,stripes,search,rank,hnsw,gpu,field,scale] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS: list[dict] = []


def record(name: str, value: float, unit: str, compared: str = "", note: str = "", show: bool = True) -> None:
    RESULTS.append({"name": name, "value": round(float(value), 4), "unit": unit, "compared_to": compared,
                    "note": note})
    if show:
        print(f"  {name:<44} {value:>12.4g} {unit:<10} {compared}")


def per_photo(fn, paths: list[Path], repeats: int = 3) -> float:
    """Median over repeats of the mean seconds per photo."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for p in paths:
            fn(p)
        times.append((time.perf_counter() - start) / len(paths))
    return float(np.median(times))


def full_decode_resize(path: Path, size: int) -> np.ndarray:
    """The plain way: decode every pixel, then resize."""
    rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


def reduced_decode(path: Path, size: int) -> np.ndarray:
    from reid.data import load_photo

    return load_photo(path, size)[0]


def from_cache(path: Path, cache) -> np.ndarray:
    return cache.load(path, path.name, 0, 0.0, None)


def load_only(path: Path, fn) -> None:
    """Load and drop: a DataLoader worker hands its batch over in shared memory, so piping each image back to
    the parent would time the pipe, not the loading."""
    fn(path)


def per_photo_workers(fn, paths: list[Path], workers: int, repeats: int = 3) -> float:
    """Median over repeats of wall seconds per photo when `workers` processes load photos side by side, one
    photo at a time each, as DataLoader workers do (one per core)."""
    from multiprocessing import get_context

    fn = partial(load_only, fn=fn)
    with get_context("spawn").Pool(workers) as pool:
        pool.map(fn, paths[:workers], chunksize=1)  # start-up and imports are not load time
        return per_photo(lambda chunk: pool.map(fn, chunk, chunksize=1), [paths], repeats) / len(paths)


def bench_data(n: int, size: int = 512, qualities: tuple[int, ...] = (75, 85, 95)) -> None:
    """3000x2000 JPEGs to 512 px: full decode + resize, against reduced decoding, against the prepared cache.

    Repeated at several JPEG qualities because the gain depends on the bits per pixel: 1/4-scale decoding skips
    the inverse DCT, the colour conversion and the large resize, but not the entropy decoding of the whole file,
    whose cost grows with the file size. The 1/8-scale decode is printed as that floor.

    Measured twice: one photo after another in this process (OpenCV may spread a large resize over the cores), and
    in one worker process per core, each loading its own photos, as the training loader does."""
    from reid.cache import PhotoCache, items_for, prepare
    from reid.synth import SPECIES, make_individual, render_photo

    print(f"data path: {n} photos of 3000x2000 px to {size} px, JPEG quality {qualities}")
    tmp = Path(tempfile.mkdtemp(prefix="reid-bench-"))
    photos = []
    for i in range(n):
        img, _, _ = render_photo(make_individual(0, i, list(SPECIES)[i % 4]), 0, f"b{i}", (1500, 1500))
        img = cv2.resize(img, (3000, 2000), interpolation=cv2.INTER_CUBIC)
        photos.append(np.clip(img + np.random.default_rng(i).normal(0, 4, img.shape), 0, 255).astype(np.uint8))

    workers = os.cpu_count() or 1
    for q in qualities:
        paths = [tmp / f"q{q}_{i}.jpg" for i in range(n)]
        for path, img in zip(paths, photos, strict=True):
            cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, q])
        cache = PhotoCache(tmp / f"cache{q}", size, 0.0)
        prepare(cache, items_for([str(p) for p in paths], [p.name for p in paths], []), n_jobs=1)
        plain, ours, cached = (partial(full_decode_resize, size=size), partial(reduced_decode, size=size),
                               partial(from_cache, cache=cache))
        t_plain, t_ours = per_photo(plain, paths), per_photo(ours, paths)
        t_floor = per_photo(lambda p: cv2.imread(str(p), cv2.IMREAD_REDUCED_COLOR_8), paths)
        t_cache = per_photo(cached, paths)
        w_plain, w_ours, w_cache = (per_photo_workers(f, paths * 4, workers) for f in (plain, ours, cached))
        bpp = np.mean([p.stat().st_size * 8 / 6e6 for p in paths])
        record(f"jpeg_q{q}_bits_per_pixel", bpp, "bit/px", "", "mean file size of the photos")
        record(f"load_3000x2000_q{q}_full_decode_resize", t_plain * 1e3, "ms/photo", "", "cv2.imread + cv2.resize")
        record(f"load_3000x2000_q{q}_reduced_decode", t_ours * 1e3, "ms/photo", "full decode")
        record(f"load_3000x2000_q{q}_entropy_floor", t_floor * 1e3, "ms/photo", "", "cv2 1/8-scale decode, no resize")
        record(f"load_3000x2000_q{q}_from_cache", t_cache * 1e3, "ms/photo", "full decode")
        record(f"speedup_q{q}_reduced_decode", t_plain / t_ours, "x", "full decode + resize")
        record(f"speedup_q{q}_cache", t_plain / t_cache, "x", "full decode + resize")
        note = f"{workers} worker processes, one per core"
        record(f"loader_3000x2000_q{q}_full_decode_resize", w_plain * 1e3, "ms/photo", "", note)
        record(f"loader_3000x2000_q{q}_reduced_decode", w_ours * 1e3, "ms/photo", "full decode", note)
        record(f"loader_3000x2000_q{q}_from_cache", w_cache * 1e3, "ms/photo", "full decode", note)
        record(f"loader_speedup_q{q}_reduced_decode", w_plain / w_ours, "x", "full decode + resize", note)
        record(f"loader_speedup_q{q}_cache", w_plain / w_cache, "x", "full decode + resize", note)


def bench_loader(steps: int) -> None:
    """Share of a training step spent waiting for the loader, demo config, on this machine."""
    from reid.config import load_config
    from reid.synth import SynthSpec, write_set
    from reid.train import Trainer

    data = ROOT / "data" / "synth"
    if not (data / "train.csv").exists():
        data = Path(tempfile.mkdtemp(prefix="reid-bench-")) / "synth"
        write_set(data, SynthSpec(individuals=120))
    cfg = load_config(ROOT / "configs" / "scratch.yaml", [f"data.root={data}", f"train.max_steps_per_epoch={steps}"])
    out = Path(tempfile.mkdtemp(prefix="reid-bench-run-"))
    trainer = Trainer(cfg, out)
    trainer.train_epoch()  # warm-up: worker start, allocator
    trainer.epoch = 1
    row = trainer.train_epoch()
    print(f"training steps: demo config, {steps} steps, {cfg.data.num_workers} workers")
    record("train_data_wait_share", row["data_wait_share"] * 100, "%", "", "time the step waits for a batch")
    record("train_images_per_s", row["images_per_s"], "img/s", "", cfg.model.backbone)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_search(n_gallery: int, n_query: int, dim: int = 512, k: int = 50) -> None:
    """Exact top-k at the real set's scale: ours (FAISS, batched), sklearn brute cosine, bare BLAS + partial sort."""
    from sklearn.neighbors import NearestNeighbors

    from reid.retrieval import normalize, search

    print(f"search: {n_gallery} gallery x {n_query} queries, {dim}-d, k={k}")
    rng = np.random.default_rng(0)
    gallery = normalize(rng.normal(size=(n_gallery, dim)).astype(np.float32))
    queries = normalize(rng.normal(size=(n_query, dim)).astype(np.float32))
    base_rss = peak_rss_gb()
    t = time.perf_counter()
    scores, idx = search(queries, gallery, k)
    t_ours = time.perf_counter() - t
    ours_peak = peak_rss_gb()

    t = time.perf_counter()
    for start in range(0, n_query, 4096):  # the same batching, so memory stays bounded for the baseline too
        sims = queries[start: start + 4096] @ gallery.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1)
        np.take_along_axis(part, order, 1)
    t_blas = time.perf_counter() - t

    t = time.perf_counter()
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(gallery)
    _, sk_idx = nn.kneighbors(queries)
    t_sklearn = time.perf_counter() - t
    agree = float(np.mean(sk_idx[:, :5] == idx[:, :5]))

    record("search_ours_faiss_flat", t_ours, "s", "", f"{n_query / t_ours:.0f} queries/s")
    record("search_sklearn_brute_cosine", t_sklearn, "s", "", "NearestNeighbors(metric='cosine', brute)")
    record("search_blas_matmul_partial_sort", t_blas, "s", "", "numpy matmul + argpartition, same batches")
    record("speedup_vs_sklearn", t_sklearn / t_ours, "x", "sklearn brute cosine")
    record("time_ratio_vs_blas", t_ours / t_blas, "x", "bare BLAS + partial sort (1.0 = the limit)")
    record("search_peak_rss", ours_peak, "GB", "", f"process peak after our search (before: {base_rss:.2f} GB)")
    record("top5_agreement_with_sklearn", agree, "share", "sklearn brute cosine")


def bench_rank(n_gallery: int, n_query: int, n_individuals: int, dim: int = 512, k: int = 50) -> None:
    """Candidates at the real set's scale with the class centres blended in (predict.centre_weight): the per-query
    Python loops that turn the top-k photos into individuals and blend the centres in, against the exact search
    that feeds them."""
    from reid.retrieval import blend_centres, normalize, rank_individuals, search

    print(f"rank: {n_gallery} gallery photos of {n_individuals} individuals x {n_query} queries, k={k}")
    rng = np.random.default_rng(0)
    gallery, queries, centres = (normalize(rng.normal(size=(n, dim)).astype(np.float32))
                                 for n in (n_gallery, n_query, n_individuals))
    labels = np.array([f"id{j}" for j in rng.integers(0, n_individuals, n_gallery)], dtype=object)
    centre_ids = np.array([f"id{j}" for j in range(n_individuals)], dtype=object)
    secs = {}
    t = time.perf_counter()
    scores, idx = search(queries, gallery, k)
    secs["search"] = time.perf_counter() - t
    t = time.perf_counter()
    ids, sims = rank_individuals(scores, idx, labels, k)
    secs["rank"] = time.perf_counter() - t
    t = time.perf_counter()
    search(queries, centres, k)
    secs["centre_search"] = time.perf_counter() - t
    t = time.perf_counter()
    blend_centres(queries, ids, sims, centres, centre_ids, 0.5, k=k)
    secs["blend_loop"] = time.perf_counter() - t - secs["centre_search"]  # blend_centres runs that search itself
    record("rank_search", secs["search"], "s", "", "exact top-k photos (FAISS flat)")
    record("rank_individuals_loop", secs["rank"], "s", "", f"top {k} individuals per query, a loop per query")
    record("blend_centres_loop", secs["blend_loop"], "s", "", "the blend's loop, its centre search taken out")
    record("rank_and_blend_share_of_search", (secs["rank"] + secs["blend_loop"]) / secs["search"], "x",
           "the photo search")


def bench_hnsw(n_gallery: int, n_query: int = 2000, dim: int = 512, k: int = 5) -> None:
    """HNSW against exact search on a clustered gallery: ten photos per individual lying close, as embeddings do.
    (Uniform random 512-d points, or clusters smaller than k, have no meaningful k-th neighbour: any index
    returns an arbitrary one.)"""
    from reid.retrieval import build_index, normalize, search

    print(f"hnsw: {n_gallery} gallery, {n_query} queries, {dim}-d")
    rng = np.random.default_rng(1)
    per_id = 10  # photos per individual: the 5 true neighbours of a query are photos of its individual
    centres = normalize(rng.normal(size=(n_gallery // per_id, dim)).astype(np.float32))
    gallery = np.empty((n_gallery, dim), np.float32)
    for start in range(0, n_gallery, 100_000):
        ids = np.arange(start, min(start + 100_000, n_gallery)) // per_id
        gallery[start: start + len(ids)] = normalize(centres[ids] + 0.6 * rng.normal(size=(len(ids), dim))
                                                     .astype(np.float32) / np.sqrt(dim))
    queries = normalize(centres[rng.integers(0, len(centres), n_query)]
                        + 0.6 * rng.normal(size=(n_query, dim)).astype(np.float32) / np.sqrt(dim))
    _, exact = search(queries, gallery, k)
    t = time.perf_counter()
    index = build_index(gallery, "hnsw")
    t_build = time.perf_counter() - t
    t = time.perf_counter()
    _, approx = index.search(queries, k)
    t_query = time.perf_counter() - t
    recall = np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)])
    record("hnsw_1m_recall_at_5", recall, "share", "exact IndexFlatIP")
    record("hnsw_1m_queries_per_s", n_query / t_query, "queries/s", "", "single process, this machine")
    record("hnsw_1m_build", t_build, "s", "")


def interleaved_medians(setups: dict, repeats: int, calls: int = 3) -> dict[str, float]:
    """Median seconds per call of each step, the steps taking turns so that drift hits them alike. `setups` maps a
    name to a function that prepares its step (layout, model) and returns it; each turn starts with an untimed call."""
    times = {name: [] for name in setups}
    for _ in range(repeats):
        for name, setup in setups.items():
            step = setup()
            step()  # the first call after a change picks its kernels
            start = time.perf_counter()
            for _ in range(calls):
                step()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: float(np.median(v)) for name, v in times.items()}


def bench_layout(repeats: int, batch: int = 32) -> None:
    """The demo model on this CPU: a training step and an embedding pass in NCHW, channels-last, and channels-last
    under bf16 autocast (interleaved repeats, medians), as train and predict run them."""
    import torch

    from reid.config import load_config
    from reid.model import ReidNet

    cfg = load_config(ROOT / "configs" / "scratch.yaml", [])
    model = ReidNet(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.rand(batch, 3, cfg.data.image_size, cfg.data.image_size)
    modes = {"nchw": (torch.contiguous_format, False), "channels_last": (torch.channels_last, False),
             "channels_last_bf16": (torch.channels_last, True)}

    def train_step(xs, bf16):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model.train()(xs).float().square().mean()
        loss.backward()
        opt.step()

    def embed_step(xs, bf16):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model.eval()(xs)

    print(f"layout: {cfg.model.backbone} at {cfg.data.image_size} px, batch {batch}, {torch.get_num_threads()} threads")
    def setup(fn, layout, bf16):
        model.to(memory_format=layout)
        return partial(fn, x.contiguous(memory_format=layout), bf16)

    for what, fn in (("train_step", train_step), ("embed", embed_step)):
        setups = {name: partial(setup, fn, layout, bf16) for name, (layout, bf16) in modes.items()}
        med = {k: v * 1000 for k, v in interleaved_medians(setups, repeats).items()}
        record(f"cpu_{what}_nchw", med["nchw"], "ms", "")
        record(f"cpu_{what}_channels_last", med["channels_last"], "ms", "nchw")
        record(f"cpu_{what}_speedup_channels_last", med["nchw"] / med["channels_last"], "x", "nchw")
        # why train.amp stays GPU-only: bf16 autocast measured against fp32 on this CPU
        record(f"cpu_{what}_channels_last_bf16", med["channels_last_bf16"], "ms", "channels_last")
        record(f"cpu_{what}_speedup_bf16", med["channels_last"] / med["channels_last_bf16"], "x", "channels_last")


def bench_gpu(steps: int, backbone: str = "tf_efficientnet_b6", size: int = 512, batch: int = 32,
              classes: int = 15_587) -> None:
    """A real-size training step on the GPU: fp32 against bf16 autocast + channels-last, same model and batch."""
    import torch

    from reid.config import load_config
    from reid.model import ReidNet, build_head, head_loss
    from reid.optim import param_groups

    if not torch.cuda.is_available():
        print("gpu: no CUDA device, skipped")
        return
    print(f"gpu: {torch.cuda.get_device_name()}, {backbone} at {size} px, batch {batch}, {classes} classes")
    cfg = load_config(None, [f"model.backbone={backbone}", "model.out_indices=[3, 4]", "loss.head=subcenter"])
    model = ReidNet(cfg.model).cuda()
    head = build_head(cfg.loss, classes, cfg.model.embedding_dim).cuda()
    opt = torch.optim.AdamW(param_groups(model, head, 1e-4, 1e-4, 10.0))
    x = torch.randn(batch, 3, size, size, device="cuda")
    y = torch.randint(0, classes, (batch,), device="cuda")
    rates = {}
    for name, dtype, layout in (("fp32", None, torch.contiguous_format), ("bf16_channels_last", torch.bfloat16,
                                                                          torch.channels_last)):
        model.to(memory_format=layout)
        xs = x.contiguous(memory_format=layout)
        torch.cuda.reset_peak_memory_stats()
        for i in range(steps + 3):
            if i == 3:
                torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                emb = model(xs)
            loss = head_loss(head, emb, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
        rates[name] = steps * batch / (time.perf_counter() - start)
        record(f"gpu_train_{name}_images_per_s", rates[name], "img/s", "", f"loss {float(loss):.3f}")
        record(f"gpu_train_{name}_peak_memory", torch.cuda.max_memory_allocated() / 2**30, "GB", "")
    record("gpu_speedup_bf16_channels_last", rates["bf16_channels_last"] / rates["fp32"], "x", "fp32")


def bench_stripes(repeats: int, batch: int = 32) -> None:
    """A channels-last training step of the demo model with `model.stripes` 2 and 4 against 1 (interleaved repeats,
    medians): what pooling over bands costs in epochs under a wall-time budget."""
    import torch

    from reid.config import load_config
    from reid.model import ReidNet

    cfgs = {n: load_config(ROOT / "configs" / "scratch.yaml", [f"model.stripes={n}"]) for n in (1, 2, 4)}
    models = {n: ReidNet(c.model).train().to(memory_format=torch.channels_last) for n, c in cfgs.items()}
    size = cfgs[1].data.image_size
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)

    def train_step(model):
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    for model in models.values():  # the first steps of a process pay for its thread pool and kernel choice
        train_step(model)
    # no per-turn setup here: each model's setup just hands back its step
    med = interleaved_medians({n: partial(partial, train_step, model) for n, model in models.items()}, repeats)
    for n in (2, 4):
        record(f"cpu_train_step_stripes_{n}_over_1", med[n] / med[1], "x", "stripes 1")


def bench_field(photos: int, queries: int) -> None:
    """The field workflow: identify `queries` new photos against a catalogue of `photos`, against embedding the
    catalogue (what re-embedding on every call would cost), and onnxruntime against torch for the embedding, on a
    short demo-recipe run of a synthetic set."""
    import subprocess

    import pandas as pd
    import torch

    from reid.catalogue import build, identify
    from reid.export import export

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reid = [sys.executable, "-m", "reid.cli"]
        # --max-photos 8 gives about 2.5 training photos per individual
        subprocess.run([*reid, "synth", str(tmp / "set"), "--individuals", str(round(photos / 2.5)),
                        "--max-photos", "8", "--min-width", "240", "--max-width", "320"],
                       check=True, capture_output=True, cwd=ROOT)
        subprocess.run([*reid, "train", "--config", str(ROOT / "configs/demo.yaml"), "--data", str(tmp / "set"),
                        "--out", str(tmp / "run"), "train.epochs=1", "train.max_steps_per_epoch=2"], check=True,
                       capture_output=True, cwd=ROOT)
        start = time.perf_counter()
        build(tmp / "run", tmp / "cat")
        catalogue_s = time.perf_counter() - start
        n = len(pd.read_csv(tmp / "cat" / "photos.csv"))
        new = sorted((tmp / "set" / "test_images").iterdir())[:queries]
        start = time.perf_counter()
        identify(tmp / "cat", new)
        identify_s = time.perf_counter() - start
        record("identify_over_catalogue", identify_s / catalogue_s, "x", f"embedding the {n}-photo catalogue",
               f"identify {len(new)} photos: {identify_s:.2f} s; catalogue: {catalogue_s:.2f} s")
        export(tmp / "run", tmp / "m.onnx")
        from reid.export import OnnxEmbedder
        from reid.run import load_run

        cfg, model, _ = load_run(tmp / "run")
        x = torch.rand(32, 3, cfg.data.image_size, cfg.data.image_size)
        onnx = OnnxEmbedder(tmp / "m.onnx")
        from reid.export import Embedder

        embedder = Embedder(model)
        med = interleaved_medians({"torch": lambda: partial(torch.no_grad()(embedder), x),
                                   "onnx": lambda: partial(onnx, x.numpy())}, 5)
        record("onnxruntime_embed_over_torch", med["onnx"] / med["torch"], "x", "torch, same batch",
               f"batch 32 at {cfg.data.image_size} px with flip TTA: onnxruntime {1000 * med['onnx']:.0f} ms, "
               f"torch {1000 * med['torch']:.0f} ms")


def run_stage(name: str, cmd: list[str], log: Path) -> tuple[float, float]:
    """One stage as its own process: (wall seconds, peak resident memory in GB of that process)."""
    import subprocess

    start = time.perf_counter()
    with open(log, "a") as out:
        pid = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).pid
        _, status, usage = os.wait4(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise SystemExit(f"scale: the {name} stage failed (exit {code}); its output is in {log}")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20


def network_seconds(config: Path, size: int, photos: int, train: bool, batch: int = 64) -> float:
    """The network's own arithmetic for `photos` photos: forward (with the flip, as predict and validation embed) or
    forward + backward, on random tensors, so no reading, decoding or searching is in it."""
    import torch

    from reid.config import load_config
    from reid.model import ReidNet

    cfg = load_config(config, [f"data.image_size={size}"])
    model = ReidNet(cfg.model).to(memory_format=torch.channels_last).train(train)
    x = torch.rand(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    with torch.set_grad_enabled(train):
        model(x)
        start = time.perf_counter()
        for _ in range(3):
            out = model(x)
            if train:
                out.sum().backward()
        per_photo = (time.perf_counter() - start) / (3 * batch)
    return per_photo * photos * (1 if train else 2)


def bench_scale(out: Path, steps: int, individuals: int, size: int = 64) -> None:
    """The whole flow at Kaggle's size: a synthetic set with the real set's shape (15,587 individuals, about 51,000
    training photos, 59-64 % of individuals with one photo, the 30 species labels), then prepare, a training epoch
    capped at `steps` steps with validation and threshold tuning, predict and evaluate. Per stage: wall time, the
    network's own arithmetic (timed apart on random tensors), the rest, and peak memory."""
    import pandas as pd

    reid = [sys.executable, "-m", "reid"]
    data, run, log = out / f"scale_set_{individuals}", out / "scale_run", out / "scale_log.txt"
    out.mkdir(parents=True, exist_ok=True)
    config = ROOT / "configs" / "demo.yaml"
    if not (data / "train.csv").is_file():  # kept between runs: rendering the set is not a stage of reid
        wall, _ = run_stage("synth", [*reid, "synth", str(data), "--individuals", str(individuals), "--max-photos",
                                      "400", "--tail", "2.1", "--species", "kaggle", "--min-width", "64",
                                      "--max-width", "96"], log)
        print(f"  synth: {wall:.0f} s")
    shutil.rmtree(data / ".reid_cache", ignore_errors=True)  # prepare builds every entry, as on a fresh folder
    train = pd.read_csv(data / "train.csv")
    test_photos = len(pd.read_csv(data / "sample_submission.csv"))
    counts = train.individual_id.value_counts()
    print(f"  set: {len(train)} training photos of {len(counts)} individuals ({100 * (counts == 1).mean():.0f} % "
          f"with one photo, most {counts.max()}), {train.species.nunique()} species labels, {test_photos} test photos")
    common = ["--config", str(config), "--data", str(data), f"data.image_size={size}", "data.cache=true"]
    stages = {"prepare": [*reid, "prepare", *common]}
    stages["train"] = [*reid, "train", "--out", str(run), "--force", *common, "train.epochs=1",
                       f"train.max_steps_per_epoch={steps}", "train.val_every=1"]
    stages["predict"] = [*reid, "predict", "--run", str(run), "--out", str(out / "scale_submission.csv"), "--force"]
    stages["evaluate"] = [*reid, "evaluate", str(out / "scale_submission.csv"), str(data / "solution.csv")]
    times = {name: run_stage(name, cmd, log) for name, cmd in stages.items()}
    metrics = pd.read_csv(run / "metrics.csv").iloc[-1]
    split = pd.read_csv(run / "split.csv")
    gallery, queries = int((~split.is_val).sum()), int(split.is_val.sum())
    from reid.config import load_config

    batch = load_config(run / "config.yaml", []).train.batch_size
    network = {"prepare": 0.0,
               "train (steps)": network_seconds(config, size, steps * batch, True, batch),
               "validation and tuning": network_seconds(config, size, gallery + queries, False),
               "predict": network_seconds(config, size, gallery + queries + test_photos, False), "evaluate": 0.0}
    walls = {"prepare": times["prepare"][0], "train (steps)": float(metrics.epoch_s),
             "validation and tuning": float(metrics.val_s), "predict": times["predict"][0],
             "evaluate": times["evaluate"][0]}
    setup = times["train"][0] - walls["train (steps)"] - walls["validation and tuning"]
    print(f"  {'stage':<24}{'wall s':>9}{'network s':>11}{'rest s':>9}{'peak GB':>9}")
    for stage, wall in walls.items():
        peak = times["train" if stage in ("train (steps)", "validation and tuning") else stage][1]
        print(f"  {stage:<24}{wall:>9.1f}{network[stage]:>11.1f}{wall - network[stage]:>9.1f}{peak:>9.2f}")
        record(f"scale_{stage.split()[0]}_rest_over_network" if network[stage] else f"scale_{stage}_s",
               (wall - network[stage]) / network[stage] if network[stage] else wall, "x" if network[stage] else "s",
               "the network's arithmetic for the same photos" if network[stage] else "",
               f"wall {wall:.1f} s, network {network[stage]:.1f} s, peak {peak:.2f} GB", show=False)
    print(f"  train start-up (data, model, {len(counts)}-class head, checks, files): {setup:.1f} s")
    record("scale_train_setup_s", setup, "s", "", "train wall time less the epoch and the validation", show=False)
    record("scale_predict_peak_gb", times["predict"][1], "GB", "4 GB", f"{test_photos} queries, {gallery + queries} "
           "gallery photos", show=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="data,loader,layout,stripes,search,rank,hnsw,gpu,field")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script itself")
    parser.add_argument("--scale-individuals", type=int, default=15_587, help="individuals of the scale set")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench", help="folder for results.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    parts = args.only.split(",")
    q = args.quick
    if "data" in parts:
        bench_data(4 if q else 12)
    if "loader" in parts:
        bench_loader(5 if q else 30)
    if "layout" in parts:
        bench_layout(2 if q else 7)
    if "stripes" in parts:
        bench_stripes(2 if q else 7)
    if "search" in parts:
        bench_search(*((5000, 2000) if q else (51_033, 27_956)))
    if "rank" in parts:
        bench_rank(*((5000, 2000, 1500) if q else (51_033, 27_956, 15_587)))
    if "hnsw" in parts:
        bench_hnsw(20_000 if q else 1_000_000, 200 if q else 2000)
    if "gpu" in parts:
        bench_gpu(3 if q else 20)
    if "field" in parts:
        bench_field(300 if q else 1000, 10)
    if "scale" in parts:  # not in the default list: about 9 minutes on 2 cores (2 more to draw the set), 400 MB
        bench_scale(args.out, 20 if q else 100, 300 if q else args.scale_individuals)
    out = args.out / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {"runs": []}
    old["runs"].append({"date": time.strftime("%Y-%m-%d %H:%M"), "quick": q, "results": RESULTS})
    from reid.files import write_json

    write_json(out, old)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

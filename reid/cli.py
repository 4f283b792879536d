"""The `reid` command: synth, prepare, train, predict, evaluate. Heavy imports happen inside commands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _synth(args) -> None:
    from .synth import SynthSpec, write_set

    spec = SynthSpec(individuals=args.individuals, new=args.new, new_share=args.new_share, seed=args.seed,
                     max_photos=args.max_photos, min_width=args.min_width, max_width=args.max_width)
    print(json.dumps(write_set(args.out, spec, jobs=args.jobs)))


def _config(args):
    from .config import load_config

    return load_config(args.config, [*([f"data.root={args.data}"] if args.data else []), *args.overrides])


def _train(args) -> None:
    from .train import RunError, train

    out = Path(args.out)
    if args.resume and not (out / "last.pt").is_file():
        raise RunError(f"--resume: {out}/last.pt does not exist; nothing to resume")
    if args.resume and args.config is None:  # continue with the run's own config
        args.config = out / "config.yaml"
    cfg = _config(args)  # --data applies with or without --config
    train(cfg, out, resume=args.resume, force=args.force)


def _predict(args) -> None:
    from .predict import predict

    out = predict([Path(r) for r in args.run], Path(args.data) if args.data else None,
                  Path(args.out) if args.out else None, args.overrides, args.force, args.weight)
    print(out)


def _prepare(args) -> None:
    from .cache import PhotoCache, from_config, items_for, prepare
    from .data import list_test, read_boxes, read_train

    cfg = _config(args)
    cfg.data.cache = True
    cache: PhotoCache = from_config(cfg)
    root = Path(cfg.data.root)
    photos = [read_train(root, cfg.data.bad_images)]
    if (root / "test_images").is_dir() or (root / "sample_submission.csv").is_file():
        photos.append(list_test(root))
    boxes = read_boxes(root, cfg.data.crops)
    items = [it for df in photos for it in items_for(df.path.tolist(), df.image.tolist(), boxes)]
    summary = prepare(cache, items, n_jobs=args.jobs)
    print(json.dumps({"cache": str(cache.folder), **summary}))
    print(f"use it with data.cache=true{'' if not cfg.data.cache_dir else f' data.cache_dir={cfg.data.cache_dir}'}")


def _evaluate(args) -> None:
    from .submission import score

    cands = Path(args.candidates) if args.candidates else Path(args.submission).with_name(
        Path(args.submission).stem + "_candidates.csv")
    s = score(args.submission, args.solution, cands if cands.is_file() else None)
    print(f"MAP@5 {s['map5']:.4f}  (known {s['map5_known']:.4f}, new {s['map5_new']:.4f}; "
          f"{100 * s['share_new']:.1f} % of {s['images']} test photos are new individuals)")
    print(f"trivial answer (new_individual first): MAP@5 {s['trivial_map5']:.4f}; "
          f"gain over it {s['map5'] - s['trivial_map5']:+.4f}")
    if "auc_new" in s:
        print(f"top-1 accuracy: known photos {s['top1_known']:.4f}, new photos {s['top1_new']:.4f}; "
              f"AUC of 'is new' from the top similarity {s['auc_new']:.4f}")
        print(f"threshold chosen with hindsight on these answers: {s['hindsight_threshold']:.3f} -> MAP@5 "
              f"{s['hindsight_map5']:.4f} (submitted: {s['map5']:.4f}, {s['hindsight_map5'] - s['map5']:+.4f})")
    if args.json:
        print(json.dumps(s))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reid", description="Photo-ID of individual whales and dolphins.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("synth", help="write a synthetic set in the Kaggle layout (with solution.csv)")
    s.add_argument("out")
    s.add_argument("--individuals", type=int, default=300, help="individuals with training photos")
    s.add_argument("--new", type=int, default=None, help="individuals seen only in test (default: new-share)")
    s.add_argument("--new-share", type=float, default=0.25, help="share of test photos showing new individuals")
    s.add_argument("--max-photos", type=int, default=60, help="most photos of one individual")
    s.add_argument("--min-width", type=int, default=320)
    s.add_argument("--max-width", type=int, default=640)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--jobs", type=int, default=-1, help="parallel processes (-1: all cores)")
    s.set_defaults(func=_synth)

    t = sub.add_parser("train", help="train a model into a run folder")
    t.add_argument("--config", type=Path, default=None)
    t.add_argument("--data", default=None, help="data folder (overrides data.root)")
    t.add_argument("--out", default="runs/latest", help="run folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    t.add_argument("--force", action="store_true", help="replace an existing run folder")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.set_defaults(func=_train)

    c = sub.add_parser("prepare", help="decode, crop and resize every photo once into a cache (parallel)")
    c.add_argument("--config", type=Path, default=None)
    c.add_argument("--data", default=None)
    c.add_argument("--jobs", type=int, default=-1)
    c.add_argument("overrides", nargs="*", metavar="key=value")
    c.set_defaults(func=_prepare)

    r = sub.add_parser("predict", help="write a submission from one run or an ensemble of runs")
    r.add_argument("--run", action="append", required=True, help="run folder; repeat for an ensemble")
    r.add_argument("--weight", type=float, action="append", help="weight of each --run in an ensemble")
    r.add_argument("--data", default=None)
    r.add_argument("--out", default=None, help="submission CSV (default RUN/submission.csv)")
    r.add_argument("--force", action="store_true", help="replace an existing submission")
    r.add_argument("overrides", nargs="*", metavar="key=value")
    r.set_defaults(func=_predict)

    e = sub.add_parser("evaluate", help="MAP@5 of a submission against a solution file")
    e.add_argument("submission")
    e.add_argument("solution")
    e.add_argument("--candidates", default=None, help="the predict's candidates CSV (default: beside SUBMISSION)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from .config import ConfigError
    from .data import DataError
    from .model import ModelError

    try:
        args.func(args)
    except (ConfigError, DataError, ModelError, FileExistsError, FileNotFoundError, ValueError) as err:
        if args.verbose:
            raise
        print(f"reid {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

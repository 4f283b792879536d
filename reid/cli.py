"""The `reid` command: synth, prepare, train, predict, evaluate, catalogue, identify, enroll, export, config. Heavy
imports happen inside commands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__

log = logging.getLogger("reid")


def _synth(args) -> None:
    from .synth import SynthSpec, write_set

    spec = SynthSpec(individuals=args.individuals, new=args.new, new_share=args.new_share, seed=args.seed,
                     max_photos=args.max_photos, min_width=args.min_width, max_width=args.max_width, tail=args.tail,
                     species=args.species)
    print(json.dumps(write_set(args.out, spec, jobs=args.jobs)))


def _config(args):
    from .config import load_config

    return load_config(args.config, [*([f"data.root={args.data}"] if args.data else []), *args.overrides])


def _train(args) -> None:
    from .run import RunError
    from .train import train

    out = Path(args.out)
    if args.resume and not (out / "last.pt").is_file():
        raise RunError(f"--resume: {out}/last.pt does not exist; nothing to resume (train it without --resume)")
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
    photos = [read_train(root, cfg.data.bad_images, check=False)]  # prepare decodes, lists and counts bad photos
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
    s = score(args.submission, args.solution, cands if cands.is_file() else None,
              Path(args.train) if args.train else None)
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


def _catalogue(args) -> None:
    from .catalogue import build

    print(build(Path(args.run), Path(args.out), Path(args.data) if args.data else None, args.force))


def _identify(args) -> None:
    from .catalogue import identify
    from .files import write_csv

    table = identify(Path(args.catalogue), [Path(p) for p in args.photos], Path(args.crops) if args.crops else None,
                     args.top, Path(args.onnx) if args.onnx else None)
    if args.html:
        from .review import review_page

        print(review_page(table, table.attrs["queries"], Path(args.html), table.attrs["threshold"]))
    if args.out:
        print(write_csv(Path(args.out), table))
        return
    import pandas as pd

    with pd.option_context("display.max_rows", None, "display.width", 160, "display.max_colwidth", 48):
        print(table.assign(best_photo=table.best_photo.map(lambda p: Path(p).name)).to_string(index=False))


def _enroll(args) -> None:
    from .catalogue import enroll

    print(json.dumps(enroll(Path(args.catalogue), Path(args.csv), Path(args.images) if args.images else None)))


def _export(args) -> None:
    from .export import export

    print(export(Path(args.run), Path(args.out)))


def _show_config(args) -> None:
    from .config import dump_config

    print(dump_config(_config(args)), end="")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    common = argparse.ArgumentParser(add_help=False)  # -v after the subcommand too
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug logging, and tracebacks for errors")
    p = argparse.ArgumentParser(prog="reid", description="Photo-ID of individual whales and dolphins.",
                                formatter_class=fmt, parents=[common])
    p.add_argument("--version", action="version", version=f"reid {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, func) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=text, formatter_class=fmt, parents=[common])
        parser.set_defaults(func=func)
        return parser

    over = {"nargs": "*", "metavar": "key=value", "help": "config overrides, e.g. train.epochs=3 (see `reid config`)"}

    s = command("synth", "write a synthetic set in the Kaggle layout (with solution.csv)", _synth)
    s.add_argument("out", help="new folder for the set")
    s.add_argument("--individuals", type=int, default=300, help="individuals with training photos")
    s.add_argument("--new", type=int, default=None, help="individuals seen only in test (default: from --new-share)")
    s.add_argument("--new-share", type=float, default=0.25, help="share of test photos showing new individuals")
    s.add_argument("--max-photos", type=int, default=60, help="most photos of one individual")
    s.add_argument("--tail", type=float, default=2.0, help="Zipf exponent of photos per individual (2.0: ~60 %% "
                   "with one photo; 2.1 with --individuals 15587 --max-photos 400: about Kaggle's 51,033 photos)")
    s.add_argument("--species", choices=("four", "kaggle"), default="four",
                   help="four drawn species, or the real train.csv's 30 labels with their shares and misspellings")
    s.add_argument("--min-width", type=int, default=320, help="narrowest photo, pixels")
    s.add_argument("--max-width", type=int, default=640, help="widest photo, pixels")
    s.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same set")
    s.add_argument("--jobs", type=int, default=-1, help="parallel processes (-1: all cores)")

    t = command("train", "train a model into a run folder", _train)
    t.add_argument("--config", type=Path, default=None, help="YAML config (default: the built-in defaults)")
    t.add_argument("--data", default=None, help="data folder in the Kaggle layout (overrides data.root)")
    t.add_argument("--out", default="runs/latest", help="run folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    t.add_argument("--force", action="store_true", help="replace an existing run folder")
    t.add_argument("overrides", **over)

    c = command("prepare", "decode, crop and resize every photo once into a cache (parallel)", _prepare)
    c.add_argument("--config", type=Path, default=None, help="YAML config whose data section sets size and crops")
    c.add_argument("--data", default=None, help="data folder in the Kaggle layout (overrides data.root)")
    c.add_argument("--jobs", type=int, default=-1, help="parallel processes (-1: all cores)")
    c.add_argument("overrides", **over)

    r = command("predict", "write a submission from one run or an ensemble of runs", _predict)
    r.add_argument("--run", action="append", required=True, help="run folder; repeat for an ensemble")
    r.add_argument("--weight", type=float, action="append", help="weight of each --run in an ensemble (> 0)")
    r.add_argument("--data", default=None, help="data folder with test_images/ (default: the run's data.root)")
    r.add_argument("--out", default=None, help="submission CSV (default: RUN/submission.csv)")
    r.add_argument("--force", action="store_true", help="replace an existing submission")
    r.add_argument("overrides", **over)

    e = command("evaluate", "MAP@5 of a submission against a solution file", _evaluate)
    e.add_argument("submission", help="submission CSV (image,predictions)")
    e.add_argument("solution", help="answers CSV (image,individual_id)")
    e.add_argument("--candidates", default=None, help="predict's candidates CSV (default: beside SUBMISSION)")
    e.add_argument("--train", default=None, help="train.csv: solution ids absent from it count as new individuals")
    e.add_argument("--json", action="store_true", help="also print every figure as one JSON line")

    k = command("catalogue", "embed a run's known photos once into a catalogue folder", _catalogue)
    k.add_argument("--run", required=True, help="run folder whose best.pt embeds the photos")
    k.add_argument("--data", default=None, help="data folder with train.csv (default: the run's data.root)")
    k.add_argument("--out", required=True, help="catalogue folder to write")
    k.add_argument("--force", action="store_true", help="replace an existing catalogue")

    i = command("identify", "ranked candidates for new photos against a catalogue", _identify)
    i.add_argument("--catalogue", required=True, help="catalogue folder from reid catalogue")
    i.add_argument("photos", nargs="+", help="photo files or folders of photos")
    i.add_argument("--crops", default=None, help="box CSV (image,x1,y1,x2,y2) for these photos")
    i.add_argument("--top", type=int, default=5, choices=range(1, 6), metavar="1-5", help="candidates per photo")
    i.add_argument("--out", default=None, help="CSV to write (default: a table on the terminal)")
    i.add_argument("--onnx", default=None, help="embed the photos with this ONNX file of the model (onnxruntime)")
    i.add_argument("--html", default=None, help="also write a review page: confirm, mark new, save decisions.csv")

    n = command("enroll", "add confirmed photos and new individuals to a catalogue, no retraining", _enroll)
    n.add_argument("--catalogue", required=True, help="catalogue folder from reid catalogue")
    n.add_argument("--csv", required=True, help="decisions: image,individual_id[,species]")
    n.add_argument("--images", default=None, help="folder the image names of --csv are in")

    x = command("export", "the run's embedding network as ONNX, its input statistics in the metadata", _export)
    x.add_argument("--run", required=True, help="run folder")
    x.add_argument("--out", required=True, help="ONNX file to write")

    g = command("config", "print the resolved config: defaults, a YAML file and overrides", _show_config)
    g.add_argument("--config", type=Path, default=None, help="YAML config (default: the built-in defaults)")
    g.add_argument("--data", default=None, help="data folder (overrides data.root)")
    g.add_argument("overrides", **over)
    return p


def interrupted(args) -> str:
    """One line for Ctrl-C: what stopped, what is saved, how to go on."""
    if args.command != "train":
        return f"reid {args.command}: interrupted; nothing was written half-way. Run the same command again."
    from .run import last_epoch

    out = Path(args.out)
    done = last_epoch(out)
    if not done:
        return ("reid train: interrupted before the first epoch ended; nothing to resume. Run the same command "
                "again.")
    from . import distributed

    world = distributed.world_size()
    per_node = os.environ.get("LOCAL_WORLD_SIZE", world)
    launch = f"torchrun --nproc_per_node={per_node} -m reid" if world > 1 else "reid"
    return (f"reid train: interrupted; {out}/last.pt holds epoch {done}. Resume with: {launch} train --out {out} "
            f"--resume")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    from .progress import setup_logging

    setup_logging(logging.DEBUG if verbose else logging.INFO)
    from .errors import ReidError

    try:
        args.func(args)
    except KeyboardInterrupt:  # under torchrun every process gets the signal; the first says what to do
        from .distributed import is_main

        if is_main():
            log.warning(interrupted(args))  # into the run's log.txt too
        return 130
    except (ReidError, OSError) as err:
        if verbose:
            raise
        text = str(err) if isinstance(err, ReidError) else f"{err.strerror or err}: {err.filename or ''}".rstrip(": ")
        print(f"reid {args.command}: error: {text}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Plots and an HTML page for a run: what a person looks at instead of reading logs."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from .files import atomic_write, write_text


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(history: list[dict], path: Path) -> None:
    """Training loss and validation MAP@5 (overall, known, new) per epoch."""
    plt = _figure()
    df = pd.DataFrame(history)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(df.epoch, df.loss, marker="o")
    a.set(xlabel="epoch", ylabel="training loss")
    for col in ("val_map5", "val_map5_known", "val_map5_new"):
        if col in df:
            b.plot(df.epoch, df[col], marker="o", label=col.replace("val_", ""))
    b.set(xlabel="epoch", ylabel="validation MAP@5", ylim=(0, 1))
    if "val_map5" in df:
        b.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def plot_threshold(tuned: dict, path: Path) -> None:
    """Validation MAP@5 against the new_individual threshold, the chosen one marked."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(tuned["grid"], tuned["curve"])
    ax.axvline(tuned["threshold"], color="r", linestyle="--", label=f"chosen {tuned['threshold']:.3f}")
    ax.set(xlabel="similarity threshold for new_individual", ylabel="validation MAP@5")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def _examples(items: list[dict]) -> str:
    """Validation photos beside their top candidates' best photos, thumbnails inside the page."""
    from .review import thumbnail

    rows = []
    for e in items:
        cands = "".join(f'<figure><img src="{thumbnail(c["photo"])}" alt=""><figcaption>{html.escape(c["id"])}<br>'
                        f'{c["similarity"]:.3f}</figcaption></figure>' for c in e["candidates"])
        verdict = "right" if e["right"] else f"wrong: answered {html.escape(e['answer'])}"
        rows.append(f'<div class="ex {"ok" if e["right"] else "bad"}"><figure><img src="{thumbnail(e["query"])}" '
                    f'alt=""><figcaption><b>{html.escape(e["truth"])}</b><br>{verdict}</figcaption></figure>{cands}'
                    "</div>")
    return "".join(rows)


def write_report(run: Path) -> Path:
    """report.html: what a person wants first (the data, how long it took and on what, the best epoch, matches
    right and wrong, the threshold curve), then the metrics per epoch and the config, folded away."""
    import platform

    import timm
    import torch

    from . import __version__

    parts = [f"<h1>reid run {html.escape(run.name)}</h1>"]
    if (run / "split.csv").exists():
        split = pd.read_csv(run / "split.csv", dtype={"image": str})
        val = split[split.is_val]
        new = ~val.individual_id.isin(split.individual_id[~split.is_val])
        species = json.loads((run / "labels.json").read_text())["species"] if (run / "labels.json").exists() else []
        parts.append(f"<p><b>Data</b>: {len(split):,} photos of {split.individual_id.nunique():,} individuals, "
                     f"{len(species)} species; training {(~split.is_val).sum():,} photos, validation {len(val):,} "
                     f"({100 * new.mean() if len(val) else 0:.0f} % of them new individuals).</p>")
    if (run / "metrics.csv").exists():
        metrics = pd.read_csv(run / "metrics.csv")
        parts.append(f"<p><b>Run</b>: {len(metrics)} epochs in {metrics.epoch_s.sum() / 60:.1f} min of training; "
                     f"reid {__version__}, torch {torch.__version__}, timm {timm.__version__}, "
                     f"Python {platform.python_version()}.</p>")
    tuned = json.loads((run / "threshold.json").read_text()) if (run / "threshold.json").exists() else {}
    if tuned.get("grid"):
        parts.append(f"<p><b>Best validation MAP@5 {tuned['map5']:.4f}</b> at epoch {tuned['epoch']} (known "
                     f"{tuned.get('map5_known', float('nan')):.4f}, new {tuned.get('map5_new', float('nan')):.4f}); "
                     f"new_individual below similarity {tuned['threshold']:.3f}.</p>")
    elif tuned:
        parts.append("<p>No validation photos: nothing was tuned; set predict.threshold.</p>")
    if tuned.get("examples"):
        parts.append("<h2>Validation matches, right and wrong</h2>" + _examples(tuned["examples"]))
    for img in ("threshold.png", "metrics.png"):
        if (run / img).exists():
            parts.append(f'<img src="{img}" alt="{img}">')
    if (run / "metrics.csv").exists():
        parts.append("<details><summary>Metrics per epoch</summary>"
                     f"{metrics.round(4).to_html(index=False, na_rep='')}</details>")
    if (run / "config.yaml").exists():
        parts.append(f"<details><summary>Config</summary><pre>{html.escape((run / 'config.yaml').read_text())}"
                     "</pre></details>")
    page = "<!doctype html><meta charset='utf-8'><title>reid run</title>" \
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}" \
           "td,th{border:1px solid #ccc;padding:2px 6px}.ex{display:flex;gap:8px;margin:6px 0;padding:4px}" \
           ".ok{border-left:6px solid #3a3}.bad{border-left:6px solid #c33}figure{margin:0;width:150px;" \
           "font-size:12px;text-align:center}figure img{max-width:140px;max-height:110px}</style>" + "\n".join(parts)
    return write_text(run / "report.html", page)


def plot_match(query: Path, candidates: list[tuple[Path, str, float, bool]], path: Path, title: str = "") -> None:
    """A query photo beside a photo of each candidate (individual id, similarity; the right one in green): what a
    person checks before confirming a match."""
    from .data import decode

    plt = _figure()
    fig, axes = plt.subplots(1, 1 + len(candidates), figsize=(2.6 * (1 + len(candidates)), 2.9))
    panels = [(query, title or "query", None), *[(p, f"{i}\n{s:.3f}", ok) for p, i, s, ok in candidates]]
    for ax, (photo, text, ok) in zip(axes, panels, strict=True):
        ax.imshow(decode(photo, 2) if Path(photo).is_file() else [[0]])
        ax.set_title(text, fontsize=9, color={True: "green", False: "black", None: "black"}[ok])
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set(color="green" if ok else "#999", linewidth=3 if ok else 1)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=80))
    plt.close(fig)

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


def write_report(run: Path) -> Path:
    """report.html: the config, the metrics table and the plots of a run folder."""
    parts = [f"<h1>reid run {html.escape(run.name)}</h1>"]
    if (run / "threshold.json").exists():
        t = json.loads((run / "threshold.json").read_text())
        parts.append(f"<p>Best validation MAP@5 <b>{t['map5']:.4f}</b> at epoch {t['epoch']}, "
                     f"new_individual threshold {t['threshold']:.3f}.</p>")
    for img in ("metrics.png", "threshold.png"):
        if (run / img).exists():
            parts.append(f'<img src="{img}" alt="{img}">')
    if (run / "metrics.csv").exists():
        parts.append(pd.read_csv(run / "metrics.csv").round(4).to_html(index=False))
    if (run / "config.yaml").exists():
        parts.append(f"<h2>Config</h2><pre>{html.escape((run / 'config.yaml').read_text())}</pre>")
    page = "<!doctype html><meta charset='utf-8'><title>reid run</title>" \
           "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}" \
           "td,th{border:1px solid #ccc;padding:2px 6px}</style>" + "\n".join(parts)
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

"""Training: the run folder, the loop (AdamW, warmup + cosine, AMP and channels-last on GPU), validation MAP@5
with the new_individual threshold tuned each epoch, atomic checkpoints and exact resume."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from . import retrieval
from .cache import from_config as cache_from_config
from .config import Config, dump_config, to_dict
from .data import SeededSampler, read_boxes, read_train, split_mask
from .files import load_checkpoint, save_checkpoint, write_csv, write_json, write_text
from .inference import amp_dtype, autocast, embed_frame, make_loader, photo_dataset, resolve_device
from .model import ReidNet, build_head, head_loss, lr_lambda, param_groups

log = logging.getLogger(__name__)


class RunError(ValueError):
    """A run folder that cannot be used as asked."""


def open_run(out: Path, resume: bool, force: bool) -> None:
    """Refuse to overwrite a run unless `force`; with `resume`, the run must hold last.pt."""
    if resume:
        if not (out / "last.pt").is_file():
            raise RunError(f"--resume: {out}/last.pt does not exist; nothing to resume")
        return
    if out.exists() and any(out.iterdir()):
        if not force:
            raise RunError(f"run folder {out} already exists; use --resume to continue it or --force to replace it")
        log.warning("--force: deleting the previous run in %s", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def add_log_file(out: Path) -> None:
    handler = logging.FileHandler(out / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)


def prepare_frame(cfg: Config) -> tuple[pd.DataFrame, list[str], list[str]]:
    """train.csv with `is_val`, `label` (class index, -1 for validation individuals absent from train) and
    `species_label`. Returns (frame, class names, species names)."""
    df = read_train(Path(cfg.data.root), cfg.data.bad_images)
    df["is_val"] = split_mask(df, cfg.split)
    classes = sorted(df.individual_id[~df.is_val].unique())
    index = {c: i for i, c in enumerate(classes)}
    df["label"] = df.individual_id.map(index).fillna(-1).astype(int)
    species = sorted(df.species.unique())
    df["species_label"] = df.species.map({s: i for i, s in enumerate(species)})
    val = df[df.is_val]
    log.info("data: %d photos of %d individuals; train %d photos / %d classes; validation %d photos "
             "(%.0f %% of them new individuals)", len(df), df.individual_id.nunique(), (~df.is_val).sum(),
             len(classes), len(val), 100 * (val.label < 0).mean() if len(val) else 0)
    return df, classes, species


class Trainer:
    """Holds the model, head, optimizer and schedule of one run; `fit` trains and validates epoch by epoch."""

    def __init__(self, cfg: Config, out: Path):
        self.cfg, self.out = cfg, out
        self.device = resolve_device(cfg.train.device)
        self.dtype = amp_dtype(cfg, self.device)
        torch.manual_seed(cfg.train.seed)
        self.df, self.classes, self.species = prepare_frame(cfg)
        self.boxes = read_boxes(Path(cfg.data.root), cfg.data.crops)
        self.cache = cache_from_config(cfg)
        self.train_df = self.df[~self.df.is_val].reset_index(drop=True)
        self.model = ReidNet(cfg.model, len(self.species) if cfg.loss.species_weight else 0).to(self.device)
        if self.device.type == "cuda" and cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.head = build_head(cfg.loss, len(self.classes), cfg.model.embedding_dim).to(self.device)
        self.loader = self._train_loader()
        self.steps = len(self.loader) if not cfg.train.max_steps_per_epoch else \
            min(len(self.loader), cfg.train.max_steps_per_epoch)
        self.optimizer = self._optimizer()
        total, warmup = cfg.train.epochs * self.steps, int(cfg.train.warmup_epochs * self.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(total, warmup, cfg.train.schedule))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.epoch, self.best, self.history = 0, -1.0, []

    def _train_loader(self):
        labels = np.stack([self.train_df.label, self.train_df.species_label], 1)
        ds = photo_dataset(self.train_df, self.cfg, self.boxes, True, labels=labels.tolist(), cache=self.cache)
        batch = min(self.cfg.train.batch_size, len(ds))
        self.sampler = SeededSampler(len(ds), self.cfg.train.seed)
        return make_loader(ds, self.cfg, self.device, batch, self.sampler, drop_last=True)

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        groups = param_groups(self.model, self.head, t.lr, t.weight_decay, self.cfg.loss.head_lr_mult)
        if t.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=t.lr, momentum=0.9, nesterov=True)
        return torch.optim.AdamW(groups, lr=t.lr)

    # ------------------------------------------------------------ state

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "best": self.best,
                "history": self.history, "config": to_dict(self.cfg)}

    def load(self, path: Path) -> None:
        state = load_checkpoint(path)
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.best, self.history = state["epoch"], state["best"], state["history"]
        log.info("resumed from %s after epoch %d (best validation MAP@5 %.4f)", path, self.epoch, self.best)

    # ------------------------------------------------------------ loop

    def _mix(self, x: torch.Tensor, gen: torch.Generator):
        """Mixup or CutMix on the batch: returns (images, partner permutation, weight of the own label)."""
        a = self.cfg.aug
        if not (a.mixup or a.cutmix):
            return x, None, 1.0
        use_cutmix = a.cutmix and (not a.mixup or torch.rand(1, generator=gen).item() < 0.5)
        alpha = a.cutmix if use_cutmix else a.mixup
        lam = float(torch.distributions.Beta(alpha, alpha).sample()) if alpha else 1.0
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        if not use_cutmix:
            return lam * x + (1 - lam) * x[perm], perm, lam
        h, w = x.shape[-2:]
        ch, cw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
        cy, cx = int(torch.randint(h, (1,), generator=gen)), int(torch.randint(w, (1,), generator=gen))
        y1, y2, x1, x2 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y1:y2, x1:x2] = x[perm][..., y1:y2, x1:x2]
        return x, perm, 1 - (y2 - y1) * (x2 - x1) / (h * w)

    def _loss(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = head_loss(self.head, emb, labels[:, 0])
        if self.model.species_head is not None:
            species_logits = self.model.species_head(emb.float())
            loss = loss + self.cfg.loss.species_weight * torch.nn.functional.cross_entropy(species_logits, labels[:, 1])
        return loss

    def train_epoch(self) -> dict:
        self.model.train()
        self.head.train()
        self.sampler.epoch = self.epoch
        torch.manual_seed(self.cfg.train.seed * 1000 + self.epoch)  # dropout etc.: same on resume
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1000 + self.epoch)
        losses, seen, start, wait = [], 0, time.perf_counter(), 0.0
        bar = tqdm(total=self.steps, desc=f"epoch {self.epoch + 1}/{self.cfg.train.epochs}", unit="step")
        tick = time.perf_counter()
        for step, batch in enumerate(self.loader):
            if step >= self.steps:
                break
            wait += time.perf_counter() - tick
            losses.append(self._step(batch, gen))
            seen += len(batch["labels"])
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}")
            tick = time.perf_counter()
        bar.close()
        elapsed = time.perf_counter() - start
        return {"loss": float(np.mean(losses)) if losses else float("nan"), "images_per_s": seen / elapsed,
                "data_wait_share": wait / elapsed, "epoch_s": elapsed}

    def _step(self, batch: dict, gen: torch.Generator) -> float:
        x = batch["images"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device)
        if self.device.type == "cuda" and self.cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x, perm, lam = self._mix(x, gen)
        with autocast(self.device, self.dtype):
            emb = self.model(x)
        loss = self._loss(emb, labels)
        if perm is not None:
            loss = lam * loss + (1 - lam) * self._loss(emb, labels[perm])
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return float(loss.detach())

    def validate(self) -> dict:
        """Embed the training photos as gallery and the validation photos as queries; tune the thresholds."""
        val = self.df[self.df.is_val]
        if val.empty:
            return {}
        gallery, _ = embed_frame(self.model, self.train_df, self.cfg, self.boxes, self.device, self.cache, "gallery")
        queries, _ = embed_frame(self.model, val, self.cfg, self.boxes, self.device, self.cache, "validation")
        truths = np.where(val.label >= 0, val.individual_id, retrieval.NEW).tolist()
        labels = self.train_df.individual_id.to_numpy()
        tuned = tune_policies(queries, gallery, labels, truths, self.cfg.predict,
                              dict(zip(self.train_df.individual_id, self.train_df.species, strict=True)))
        return {"val_map5": tuned["map5"], "val_threshold": tuned["threshold"],
                "val_map5_known": tuned["map5_known"], "val_map5_new": tuned["map5_new"], "_tuned": tuned}

    def fit(self) -> None:
        cfg = self.cfg
        while self.epoch < cfg.train.epochs:
            row = {"epoch": self.epoch + 1, **self.train_epoch()}
            self.epoch += 1
            if self.epoch % cfg.train.val_every == 0 or self.epoch == cfg.train.epochs:
                row.update(self.validate())
            tuned = row.pop("_tuned", None)
            self.history.append(row)
            log.info("epoch %d: %s", self.epoch, ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"))
            if tuned and row["val_map5"] > self.best:
                self.best = row["val_map5"]
                self._save_best(tuned)
            save_checkpoint(self.out / "last.pt", self.state())
            write_csv(self.out / "metrics.csv", pd.DataFrame(self.history))
            from .report import plot_metrics

            plot_metrics(self.history, self.out / "metrics.png")
        if self.best < 0:  # no validation set: the last weights are the best we know
            self._save_best({"threshold": 0.5, "map5": float("nan"), "grid": [], "curve": [], "map5_similarity": 0.0,
                             "map5_share": 0.0, "map5_species": 0.0})

    def _save_best(self, tuned: dict) -> None:
        save_checkpoint(self.out / "best.pt", {"model": self.model.state_dict(), "epoch": self.epoch,
                                               "threshold": tuned["threshold"], "val_map5": tuned["map5"]})
        write_json(self.out / "threshold.json", {"policy": "similarity", "epoch": self.epoch, **tuned})
        if tuned["grid"]:
            from .report import plot_threshold

            plot_threshold(tuned, self.out / "threshold.png")
        log.info("new best validation MAP@5 %.4f at epoch %d (policy %s; threshold %.3f; MAP@5 by policy: "
                 "similarity %.4f, share %.4f, species %.4f)", tuned["map5"], self.epoch, self.cfg.predict.policy,
                 tuned["threshold"], tuned["map5_similarity"], tuned["map5_share"], tuned["map5_species"])


def tune_policies(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray, truths: list[str], pcfg,
                  species_of: dict[str, str]) -> dict:
    """Validation MAP@5 under each new_individual policy, with what predict needs to apply them to test photos:
    the tuned threshold and its curve, the new-first share it gives, per-species thresholds, and whether query
    expansion helped."""
    kw = {"k": pcfg.k, "gallery_mode": pcfg.gallery, "index": pcfg.index}
    ids, sims = retrieval.candidates(queries, gallery, labels, **kw)
    tuned = retrieval.tune_threshold(ids, sims, truths)
    if pcfg.query_expansion:
        qe_ids, qe_sims = retrieval.candidates(queries, gallery, labels, **kw, query_expansion=pcfg.query_expansion)
        qe = retrieval.tune_threshold(qe_ids, qe_sims, truths)
        tuned["query_expansion_helps"] = qe["map5"] > tuned["map5"]
        log.info("query expansion (top %d): validation MAP@5 %.4f against %.4f without: %s", pcfg.query_expansion,
                 qe["map5"], tuned["map5"], "kept" if tuned["query_expansion_helps"] else "turned off")
        if tuned["query_expansion_helps"]:
            ids, sims, tuned = qe_ids, qe_sims, {**qe, "query_expansion_helps": True}
    pos = retrieval.new_position(sims, tuned["threshold"])
    tuned["new_first_share"] = float(np.mean(pos == 0))
    groups = np.array([species_of.get(i, "") for i in ids[:, 0]])
    tuned["per_species"] = retrieval.tune_by_group(ids, sims, truths, groups, tuned["threshold"])
    for policy in ("similarity", "share", "species"):
        split = retrieval.map_at_5_split(retrieval.decide(ids, sims, retrieval.policy_thresholds(
            policy, sims, tuned, groups)), truths)
        tuned[f"map5_{policy}"] = split["map5"]
        if policy == pcfg.policy:
            tuned.update(map5_known=split["map5_known"], map5_new=split["map5_new"])
    tuned["map5"] = tuned[f"map5_{pcfg.policy}"]
    return tuned


def train(cfg: Config, out: Path, resume: bool = False, force: bool = False) -> Path:
    """Train into the run folder `out`; returns it."""
    open_run(out, resume, force)
    add_log_file(out)
    write_text(out / "config.yaml", dump_config(cfg))
    trainer = Trainer(cfg, out)
    write_json(out / "labels.json", {"classes": trainer.classes, "species": trainer.species})
    write_csv(out / "split.csv", trainer.df[["image", "individual_id", "is_val"]])
    if resume:
        trainer.load(out / "last.pt")
    log.info("training %s on %s: %d steps per epoch, %d epochs", cfg.model.backbone, trainer.device,
             trainer.steps, cfg.train.epochs)
    trainer.fit()
    from .report import write_report

    write_report(out)
    log.info("run finished: %s (best validation MAP@5 %.4f)", out, trainer.best)
    return out

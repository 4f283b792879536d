"""Training: the run folder, the loop (AdamW, warmup + cosine, AMP and channels-last on GPU), validation MAP@5
with the new_individual threshold tuned each epoch, atomic checkpoints and exact resume."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import retrieval
from .cache import from_config as cache_from_config
from .config import Config, dump_config, to_dict
from .data import SeededSampler, read_boxes, read_train, split_mask
from .files import load_checkpoint, save_checkpoint, write_csv, write_json, write_text
from .inference import (
    amp_dtype,
    autocast,
    embed_frame,
    make_loader,
    memory_format,
    photo_dataset,
    resize_to,
    resolve_device,
)
from .model import (
    LevelHeads,
    ReidNet,
    build_head,
    class_centres,
    distill_loss,
    freeze_norm_stats,
    head_loss,
    input_stats,
    lr_lambda,
    pair_loss,
    param_groups,
    zero_init_last,
)
from .progress import progress_bar
from .run import RunError, add_log_file, check_resume, load_run, open_run

log = logging.getLogger(__name__)

MAX_BAD_STEPS = 25  # non-finite losses in a row before training counts as diverged; fewer are skipped


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
        self.bad_steps = 0  # non-finite losses in a row, across epochs
        self.device = resolve_device(cfg.train.device)
        self.dtype = amp_dtype(cfg, self.device)
        torch.manual_seed(cfg.train.seed)
        self.df, self.classes, self.species = prepare_frame(cfg)
        self.boxes = read_boxes(Path(cfg.data.root), cfg.data.crops)
        self.cache = cache_from_config(cfg)
        self.train_df = self.df[~self.df.is_val].reset_index(drop=True)
        self.model = ReidNet(cfg.model, len(self.species) if cfg.loss.species_weight else 0)
        if cfg.train.zero_init_last:
            log.info("zero-initialised the last norm of %d residual blocks", zero_init_last(self.model))
        self.model.to(self.device, memory_format=memory_format(cfg))
        counts = self.train_df.label.value_counts().reindex(range(len(self.classes)), fill_value=1).to_numpy()
        self.head = build_head(cfg.loss, len(self.classes), cfg.model.embedding_dim, counts).to(self.device)
        self.level_heads = LevelHeads(self.model.level_channels, cfg.loss, len(self.classes), cfg.model.embedding_dim,
                                      counts).to(self.device) if cfg.loss.level_weight else None
        self.pairs = pair_loss(cfg.loss)
        self.teacher = self._teacher()
        self.ema = self._ema()
        self.loader = self._train_loader()
        self.steps = len(self.loader) if not cfg.train.max_steps_per_epoch else \
            min(len(self.loader), cfg.train.max_steps_per_epoch)
        self.optimizer = self._optimizer()
        updates = self.steps // cfg.train.accumulate
        total, warmup = cfg.train.epochs * updates, int(cfg.train.warmup_epochs * updates)
        self.budget_s, self.started = cfg.train.time_budget_min * 60, time.perf_counter()
        progress = self.progress if self.budget_s else None  # the schedule follows the clock
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(total, warmup, cfg.train.schedule, progress))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.epoch, self.best, self.history, self.first_epoch = 0, -1.0, [], 0
        self.skipped_photos = 0  # photos that failed to decode during training, dropped from their batches

    def _train_loader(self):
        labels = np.stack([self.train_df.label, self.train_df.species_label], 1)
        ds = photo_dataset(self.train_df, self.cfg, self.boxes, True, labels=labels.tolist(), cache=self.cache,
                           on_error="skip")  # a photo that fails in a worker anyway is dropped from its batch
        batch = min(self.cfg.train.batch_size, len(ds))
        m = self.cfg.train.m_per_class
        self.sampler = SeededSampler(len(ds), self.cfg.train.seed, labels=self.train_df.label.to_numpy() if m else None,
                                     m_per_class=m)
        return make_loader(ds, self.cfg, self.device, batch, self.sampler, drop_last=True)

    def _teacher(self) -> torch.nn.Module | None:
        if not self.cfg.train.teacher:
            return None
        _, teacher, _ = load_run(Path(self.cfg.train.teacher))
        log.info("distilling from the teacher run %s (weight %g, temperature %g)", self.cfg.train.teacher,
                 self.cfg.train.distill_weight, self.cfg.train.distill_temperature)
        return teacher.to(self.device, memory_format=memory_format(self.cfg)).eval().requires_grad_(False)

    def _ema(self):
        if not self.cfg.train.ema:
            return None
        from timm.utils import ModelEmaV3

        return ModelEmaV3(self.model, decay=self.cfg.train.ema)

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights validated and saved as best: the moving average when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg.train
        lr = t.lr * (self.loader.batch_size / t.lr_reference_batch if t.lr_reference_batch else 1.0)
        body, heads = torch.nn.ModuleList([self.model]), torch.nn.ModuleList([self.head])
        if self.level_heads is not None:  # the levels' necks learn as the main neck does, their centres as its centres
            body.append(self.level_heads.necks)
            heads.append(self.level_heads.heads)
        groups = param_groups(body, heads, lr, t.weight_decay, self.cfg.loss.head_lr_mult, t.backbone_lr_mult,
                              self.model.backbone)
        if t.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
        if t.optimizer == "adabound":
            try:
                import adabound
            except ImportError as err:
                raise RunError("train.optimizer=adabound needs the adabound package: pip install adabound") from err
            return adabound.AdaBound(groups, lr=lr, final_lr=lr * 30)
        return torch.optim.AdamW(groups, lr=lr)

    # ------------------------------------------------------------ state

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def out_of_time(self) -> bool:
        return bool(self.budget_s) and self.elapsed() >= self.budget_s

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "head": self.head.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "best": self.best,
                "history": self.history, "config": to_dict(self.cfg),
                "ema": self.ema.state_dict() if self.ema is not None else {},
                "level_heads": self.level_heads.state_dict() if self.level_heads is not None else {}}

    def load(self, path: Path) -> None:
        state = load_checkpoint(path)
        if bool(state.get("level_heads")) != (self.level_heads is not None):  # else the optimizer's groups won't fit
            has = "with" if state.get("level_heads") else "without"
            raise RunError(f"{path} was trained {has} loss.level_weight, unlike this config: resume it with its own "
                           "config (no --config), or train again with --force")
        try:
            self._restore(state)
        except (RuntimeError, ValueError) as err:  # weights or optimizer groups of another shape than this config's
            raise RunError(f"{path} does not fit the run this config builds ({str(err).strip().splitlines()[0]}): "
                           "resume it with its own config (no --config), or train again with --force") from err
        self.epoch, self.best, self.history = state["epoch"], state["best"], state["history"]
        log.info("resumed from %s after epoch %d (best validation MAP@5 %.4f)", path, self.epoch, self.best)

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.level_heads is not None:
            self.level_heads.load_state_dict(state["level_heads"])

    # ------------------------------------------------------------ loop

    def _mix(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, list]:
        """Mixup, CutMix or RICAP on the batch, one drawn per batch among those switched on. Returns the images
        and [(partner permutation or None for the photo's own label, label weight), ...]."""
        a = self.cfg.aug
        kinds = [k for k in ("mixup", "cutmix", "ricap") if getattr(a, k)]
        if not kinds:
            return x, [(None, 1.0)]
        kind = kinds[int(torch.randint(len(kinds), (1,), generator=gen))]
        alpha = getattr(a, kind)
        beta = torch.distributions.Beta(alpha, alpha)
        lam = float(beta.sample())
        perm = torch.randperm(len(x), generator=gen).to(x.device)
        if kind == "mixup":
            return lam * x + (1 - lam) * x[perm], [(None, lam), (perm, 1 - lam)]
        if kind == "cutmix":
            return cutmix(x, perm, lam, gen)
        return ricap(x, float(beta.sample()), lam, gen)

    def _loss(self, emb: torch.Tensor, pooled: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        loss = head_loss(self.head, emb, labels[:, 0])
        if self.level_heads is not None:
            loss = loss + self.cfg.loss.level_weight * self.level_heads(pooled, labels[:, 0])
        if self.model.species_head is not None:
            species_logits = self.model.species_head(emb.float())
            loss = loss + self.cfg.loss.species_weight * torch.nn.functional.cross_entropy(species_logits, labels[:, 1])
        return loss

    def train_epoch(self) -> dict:
        self.model.train()
        warming = self.epoch < self.cfg.train.head_warmup_epochs  # the head warms up on a frozen backbone
        self.model.backbone.requires_grad_(not warming)
        if warming or self.cfg.model.freeze_bn:
            freeze_norm_stats(self.model.backbone)
        self.head.train()
        if self.level_heads is not None:
            self.level_heads.train()
        self.sampler.epoch = self.epoch
        torch.manual_seed(self.cfg.train.seed * 1000 + self.epoch)  # dropout etc.: same on resume
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1000 + self.epoch)
        losses, seen, start, wait = [], 0, time.perf_counter(), 0.0
        tick = time.perf_counter()
        # closed on the way out of an error too, so that the error is the last line the user sees
        desc = f"epoch {self.epoch + 1}/{self.cfg.train.epochs}"
        with progress_bar(total=self.steps, desc=desc, unit="step") as bar:
            for step, batch in enumerate(self.loader):
                if step >= self.steps or self.out_of_time():
                    break
                wait += time.perf_counter() - tick
                losses.append(self._step(batch, gen, step))
                seen += len(batch["labels"])
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}")
                tick = time.perf_counter()
        elapsed = time.perf_counter() - start
        finite = [v for v in losses if np.isfinite(v)]
        if self.skipped_photos:
            log.warning("%d photo(s) could not be decoded so far and were left out of their batches",
                        self.skipped_photos)
        if len(finite) < len(losses):
            log.warning("epoch %d: skipped %d of %d steps whose loss was not finite", self.epoch + 1,
                        len(losses) - len(finite), len(losses))
        return {"loss": float(np.mean(finite)) if finite else float("nan"), "images_per_s": seen / elapsed,
                "data_wait_share": wait / elapsed, "epoch_s": elapsed}

    def _step(self, batch: dict, gen: torch.Generator, step: int) -> float:
        read = batch["indices"] >= 0  # photos that failed to decode carry no label: drop them
        if not read.all():
            self.skipped_photos += int((~read).sum())
            batch = {k: v[read] for k, v in batch.items() if k in ("images", "labels")}
            if len(batch["labels"]) < 2:
                return float("nan")
        x = batch["images"].to(self.device, non_blocking=True)
        labels = batch["labels"].to(self.device)
        x = self._rescale(x, gen)
        x = x.contiguous(memory_format=memory_format(self.cfg))
        x, parts = self._mix(x, gen)
        with autocast(self.device, self.dtype):
            pooled = self.model.levels(x)
            emb = self.model.embed(pooled)
        loss = sum(w * self._loss(emb, pooled, labels if perm is None else labels[perm]) for perm, w in parts)
        if self.pairs is not None:
            miner, triplet = self.pairs
            with torch.autocast(self.device.type, enabled=False):
                e = emb.float()
                loss = loss + self.cfg.loss.pair_weight * triplet(e, labels[:, 0], miner(e, labels[:, 0]))
        if self.teacher is not None:
            with torch.no_grad(), autocast(self.device, self.dtype):
                target = self.teacher(x)
            t = self.cfg.train
            loss = loss + t.distill_weight * distill_loss(emb.float(), target.float(), t.distill_temperature)
        self.scaler.scale(loss / self.cfg.train.accumulate).backward()
        value = float(loss.detach())  # read after backward is queued, as before, so a GPU does not wait on it
        if not np.isfinite(value):
            return self._skip_step(step)
        self.bad_steps = 0
        if (step + 1) % self.cfg.train.accumulate == 0:
            self._update()
        return value

    def _skip_step(self, step: int) -> float:
        """Drop the gradients of a batch whose loss is not finite (an fp16 overflow, a bad batch) before they
        poison the weights; many in a row mean the weights themselves have diverged, and training stops."""
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        if self.bad_steps >= MAX_BAD_STEPS:
            t = self.cfg.train
            raise RunError(f"training diverged in epoch {self.epoch + 1} (step {step + 1}): the loss was not finite "
                           f"for {self.bad_steps} steps in a row; lower train.lr (now {t.lr:g}) or train.grad_clip "
                           f"(now {t.grad_clip:g}) and train again")
        return float("nan")

    def _update(self) -> None:
        if self.cfg.train.grad_clip:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)

    def time_left(self) -> str:
        """An estimate of the training time still to go, from the epochs run in this process so far."""
        run = len(self.history) - self.first_epoch
        if self.budget_s:
            return f"about {max(0.0, self.budget_s - self.elapsed()) / 60:.1f} min left (time budget)"
        left = self.cfg.train.epochs - self.epoch
        if run <= 0 or left <= 0:
            return "done" if left <= 0 else ""
        return f"about {self.elapsed() / run * left / 60:.1f} min left"

    def progress(self) -> float:
        """The share of training done: of the wall-time budget when there is one, else of the epochs."""
        if self.budget_s:
            return min(1.0, self.elapsed() / self.budget_s)
        return self.epoch / max(1, self.cfg.train.epochs)

    def _rescale(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        side = batch_side(self.cfg.aug, self.cfg.data.image_size, self.progress(), gen)
        return resize_to(x, (side, side))

    def validate(self) -> dict:
        """Embed the training photos as gallery and the validation photos as queries; tune the thresholds."""
        val = self.df[self.df.is_val]
        if val.empty:
            return {}
        model = self.eval_model
        gallery, _ = embed_frame(model, self.train_df, self.cfg, self.boxes, self.device, self.cache, "gallery")
        queries, _ = embed_frame(model, val, self.cfg, self.boxes, self.device, self.cache, "validation")
        truths = np.where(val.label >= 0, val.individual_id, retrieval.NEW).tolist()
        labels = self.train_df.individual_id.to_numpy()
        vectors, rows = class_centres(self.head)
        tuned = retrieval.tune_policies(queries, gallery, labels, truths, self.cfg.predict,
                              dict(zip(self.train_df.individual_id, self.train_df.species, strict=True)),
                              (vectors.numpy(), np.asarray(self.classes, dtype=object)[rows.numpy()]))
        tuned.update(retrieval.search_settings(self.cfg.predict, centres_used=True))
        return {"val_map5": tuned["map5"], "val_threshold": tuned["threshold"],
                "val_map5_known": tuned["map5_known"], "val_map5_new": tuned["map5_new"], "_tuned": tuned}

    def fit(self) -> None:
        cfg = self.cfg
        self.started = time.perf_counter()  # the wall-time budget counts training, not set-up
        self.first_epoch = len(self.history)  # epochs run before a resume do not time this process
        while self.epoch < cfg.train.epochs and not self.out_of_time():
            row = {"epoch": self.epoch + 1, **self.train_epoch()}
            self.epoch += 1
            due = self.epoch % cfg.train.val_every == 0 or self.epoch == cfg.train.epochs or self.out_of_time()
            self._end_epoch(row, due)
        if self.history and "val_map5" not in self.history[-1] and self.df.is_val.any():
            self._end_epoch(self.history.pop(), True)  # time ran out between epochs: validate the last one
        if self.best < 0:  # no validation set: the last weights are the best we know
            threshold = 0.5 if cfg.predict.threshold is None else cfg.predict.threshold
            log.warning("no validation photos, so no new_individual threshold is tuned: predict uses %.2f unless "
                        "predict.threshold is set", threshold)
            self._save_best({"threshold": threshold, "map5": float("nan"), "grid": [], "curve": [],
                             "map5_similarity": 0.0, "map5_share": 0.0, "map5_species": 0.0})

    def _end_epoch(self, row: dict, validate: bool) -> None:
        """Validate if due, keep the best, then write last.pt, the metrics and their plot."""
        if validate:
            row.update(self.validate())
        tuned = row.pop("_tuned", None)
        self.history.append(row)
        log.info("epoch %d/%d: %s; %s", row["epoch"], self.cfg.train.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"), self.time_left())
        if tuned and row["val_map5"] > self.best:
            self.best = row["val_map5"]
            self._save_best(tuned)
        save_checkpoint(self.out / "last.pt", self.state())
        write_csv(self.out / "metrics.csv", pd.DataFrame(self.history))
        from .report import plot_metrics

        plot_metrics(self.history, self.out / "metrics.png")

    def _save_best(self, tuned: dict) -> None:
        centres, rows = class_centres(self.head)
        record = {"policy": "similarity", "epoch": self.epoch, **tuned}
        # best.pt holds the record predict uses; threshold.json is its copy for people, written from the same dict
        save_checkpoint(self.out / "best.pt", {"model": self.eval_model.state_dict(), "epoch": self.epoch,
                                               "threshold": tuned["threshold"], "val_map5": tuned["map5"],
                                               "centres": centres, "centre_rows": rows, "tuned": record})
        write_json(self.out / "threshold.json", record)
        if tuned["grid"]:
            from .report import plot_threshold

            plot_threshold(tuned, self.out / "threshold.png")
        log.info("new best validation MAP@5 %.4f at epoch %d (policy %s; threshold %.3f; MAP@5 by policy: "
                 "similarity %.4f, share %.4f, species %.4f)", tuned["map5"], self.epoch, self.cfg.predict.policy,
                 tuned["threshold"], tuned["map5_similarity"], tuned["map5_share"], tuned["map5_species"])


def batch_side(aug, image_size: int, progress: float, gen: torch.Generator) -> int:
    """The side a training batch is resized to, a multiple of 32: progressive resizing grows it from
    `aug.progressive` x image_size to image_size as training goes on (early epochs cost less); multi-scale
    training draws one of `aug.multiscale` per batch; otherwise image_size."""
    if aug.progressive:
        scale = aug.progressive + (1.0 - aug.progressive) * progress
    elif aug.multiscale:
        scale = aug.multiscale[int(torch.randint(len(aug.multiscale), (1,), generator=gen))]
    else:
        return image_size
    return max(32, int(round(image_size * scale / 32)) * 32)


def cutmix(x: torch.Tensor, perm: torch.Tensor, lam: float, gen: torch.Generator) -> tuple[torch.Tensor, list]:
    """A box of a partner photo pasted in; labels weighted by the areas."""
    h, w = x.shape[-2:]
    ch, cw = int(h * (1 - lam) ** 0.5), int(w * (1 - lam) ** 0.5)
    cy, cx = int(torch.randint(h, (1,), generator=gen)), int(torch.randint(w, (1,), generator=gen))
    y1, y2, x1, x2 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., y1:y2, x1:x2] = x[perm][..., y1:y2, x1:x2]
    area = (y2 - y1) * (x2 - x1) / (h * w)
    return x, [(None, 1 - area), (perm, area)]


def ricap(x: torch.Tensor, bw: float, bh: float, gen: torch.Generator) -> tuple[torch.Tensor, list]:
    """RICAP: four photos' random crops tiled into one; labels weighted by the tiles' areas."""
    h, w = x.shape[-2:]
    cw, ch = max(1, min(w - 1, int(round(w * bw)))), max(1, min(h - 1, int(round(h * bh))))
    tiles = [(0, 0, ch, cw), (0, cw, ch, w - cw), (ch, 0, h - ch, cw), (ch, cw, h - ch, w - cw)]
    out, parts = torch.empty_like(x), []
    for k, (ty, tx, th, tw) in enumerate(tiles):
        perm = torch.randperm(len(x), generator=gen).to(x.device) if k else None
        src = x if perm is None else x[perm]
        sy = int(torch.randint(h - th + 1, (1,), generator=gen))
        sx = int(torch.randint(w - tw + 1, (1,), generator=gen))
        out[..., ty: ty + th, tx: tx + tw] = src[..., sy: sy + th, sx: sx + tw]
        parts.append((perm, th * tw / (h * w)))
    return out, parts


def train(cfg: Config, out: Path, resume: bool = False, force: bool = False) -> Path:
    """Train into the run folder `out`; returns it. Everything is checked (data, model, a resume's fit to the run)
    before the run's files are written, so a failed start leaves nothing that blocks the next try."""
    open_run(out, resume, force)
    add_log_file(out)
    cfg.data.root = str(Path(cfg.data.root).resolve())  # the run is used later from other folders
    cfg.data.mean, cfg.data.std = (list(v) for v in input_stats(cfg))  # saved in the run: predict normalizes alike
    trainer = Trainer(cfg, out)
    split = trainer.df[["image", "individual_id", "is_val"]]
    if resume:
        check_resume(out, load_checkpoint(out / "last.pt"), cfg, trainer.classes, split)
        trainer.load(out / "last.pt")
    write_text(out / "config.yaml", dump_config(cfg))
    write_json(out / "labels.json", {"classes": trainer.classes, "species": trainer.species})
    write_csv(out / "split.csv", split)
    log.info("training %s on %s: %d steps per epoch, %d epochs", cfg.model.backbone, trainer.device,
             trainer.steps, cfg.train.epochs)
    trainer.fit()
    from .report import write_report

    write_report(out)
    log.info("run finished: %s (%s)", out, f"best validation MAP@5 {trainer.best:.4f}" if trainer.best >= 0 else
             "no validation photos")
    return out

"""Training: the loop (warmup then cosine or step decay, AMP and channels-last on GPU), validation each few epochs,
atomic checkpoints and exact resume, in one process or one per GPU under torchrun. Its parts live beside it: optim
(optimizer, schedule), losses (the weighted terms), batch_mix (mixing, batch sizes), validation, run (the run folder),
distributed (several processes)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import distributed
from .batch_mix import batch_side, mix_batch
from .cache import from_config as cache_from_config
from .config import Config, dump_config, to_dict
from .data import SeededSampler, read_boxes, read_train, split_mask
from .files import load_checkpoint, write_csv, write_json, write_text
from .inference import amp_dtype, autocast, make_loader, memory_format, photo_dataset, resize_to, resolve_device
from .losses import TrainingLoss, loss_terms
from .model import LevelHeads, ReidNet, build_head, freeze_norm_stats, input_stats, zero_init_last
from .optim import build_optimizer, lr_lambda
from .progress import progress_bar
from .run import RunError, add_log_file, check_resume, load_run, open_run, restore, save_best, save_epoch, untuned
from .validation import validate

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
    """One run's model, heads, optimizer and schedule; `fit` trains and validates epoch by epoch."""

    def __init__(self, cfg: Config, out: Path):
        self.cfg, self.out = cfg, out
        self.device, self.bad_steps, self.skipped_photos = distributed.start(resolve_device(cfg.train.device)), 0, 0
        self.dtype = amp_dtype(cfg, self.device)
        torch.manual_seed(cfg.train.seed)
        self.df, self.classes, self.species = prepare_frame(cfg)
        self.boxes, self.cache = read_boxes(Path(cfg.data.root), cfg.data.crops), cache_from_config(cfg)
        self.train_df = self.df[~self.df.is_val].reset_index(drop=True)
        self.model, self.head, self.level_heads = build_networks(cfg, self.device, self.train_df.label,
                                                                 len(self.classes), len(self.species))
        amp = lambda: autocast(self.device, self.dtype)  # noqa: E731
        terms = loss_terms(cfg, self.model, self.head, self.level_heads, build_teacher(cfg, self.device), amp)
        self.net = distributed.wrap(TrainingLoss(self.model, self.head, self.level_heads, terms, amp), self.device,
                                    find_unused=cfg.train.head_warmup_epochs > 0 or distributed.world_size() > 1
                                    and distributed.has_unused_parameters(self.model, cfg.data.image_size))
        self.ema = build_ema(cfg, self.model)
        self.loader, self.sampler = train_loader(self.train_df, cfg, self.boxes, self.device, self.cache)
        self.steps = min(len(self.loader), cfg.train.max_steps_per_epoch or len(self.loader))
        body, heads = torch.nn.ModuleList([self.model]), torch.nn.ModuleList([self.head])
        if self.level_heads is not None:  # the levels' necks learn as the main neck does, their centres as its centres
            body.append(self.level_heads.necks)
            heads.append(self.level_heads.heads)
        self.optimizer = build_optimizer(cfg, body, heads, self.model.backbone,
                                         self.loader.batch_size * distributed.world_size())  # the global batch
        updates = self.steps // cfg.train.accumulate
        total, warmup = cfg.train.epochs * updates, int(cfg.train.warmup_epochs * updates)
        self.budget_s, self.started = cfg.train.time_budget_min * 60, time.perf_counter()
        progress = self.progress if self.budget_s else None  # the schedule follows the clock
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lr_lambda(total, warmup, cfg.train.schedule, progress))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.epoch, self.best, self.history, self.first_epoch = 0, -1.0, [], 0

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights validated and saved as best: the moving average when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

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

    def load(self, path: Path, state: dict | None = None) -> None:
        parts = {"model": self.model, "head": self.head, "optimizer": self.optimizer, "scheduler": self.scheduler,
                 "scaler": self.scaler, "ema": self.ema, "level_heads": self.level_heads}
        state = restore(parts, path, state)
        self.epoch, self.best, self.history = state["epoch"], state["best"], state["history"]
        log.info("resumed from %s after epoch %d (best validation MAP@5 %.4f)", path, self.epoch, self.best)

    def train_epoch(self) -> dict:
        self.net.train()  # the network and its heads
        warming = self.epoch < self.cfg.train.head_warmup_epochs  # the head warms up on a frozen backbone
        self.model.backbone.requires_grad_(not warming)
        if self.cfg.model.freeze_bn:
            freeze_norm_stats(self.net)
        elif warming:
            freeze_norm_stats(self.model.backbone)
        self.sampler.epoch = self.epoch
        torch.manual_seed(self.cfg.train.seed * 1000 + self.epoch)  # dropout etc.: same on resume
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1000 + self.epoch)
        losses, seen, start, wait = [], 0, time.perf_counter(), 0.0
        tick = time.perf_counter()
        # closed on the way out of an error too, so that the error is the last line the user sees
        with progress_bar(total=self.steps, desc=f"epoch {self.epoch + 1}/{self.cfg.train.epochs}", unit="step") as bar:
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
                if distributed.world_size() > 1:  # the other processes would wait for this one's gradients
                    raise RunError("a training batch lost all but one photo to decoding errors; run `reid prepare` "
                                   "to list the unreadable photos and set data.bad_images=skip")
                return float("nan")
        x = batch["images"].to(self.device, non_blocking=True)
        side = batch_side(self.cfg.aug, self.cfg.data.image_size, gen)
        x = resize_to(x, (side, side)).contiguous(memory_format=memory_format(self.cfg))
        x, parts = mix_batch(x, self.cfg.aug, gen)
        loss = self.net(x, batch["labels"].to(self.device), parts)
        self.scaler.scale(loss / self.cfg.train.accumulate).backward()
        # read after backward is queued, so a GPU does not wait on it; the mean over processes, so all skip alike
        value = float(distributed.mean(loss.detach()))
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
        if self.budget_s:
            return f"about {max(0.0, self.budget_s - self.elapsed()) / 60:.1f} min left (time budget)"
        run, left = len(self.history) - self.first_epoch, self.cfg.train.epochs - self.epoch
        return "done" if left <= 0 else f"about {self.elapsed() / run * left / 60:.1f} min left" if run > 0 else ""

    def progress(self) -> float:
        """The share of training done: of the wall-time budget when there is one, else of the epochs."""
        if self.budget_s:
            return min(1.0, self.elapsed() / self.budget_s)
        return self.epoch / max(1, self.cfg.train.epochs)

    def fit(self) -> None:
        cfg = self.cfg
        self.started = time.perf_counter()  # the wall-time budget counts training, not set-up
        self.first_epoch = len(self.history)  # epochs run before a resume do not time this process
        while self.epoch < cfg.train.epochs and not self.out_of_time():
            row = {"epoch": self.epoch + 1, **self.train_epoch()}
            self.epoch += 1
            due = self.epoch % cfg.train.val_every == 0 or self.epoch == cfg.train.epochs or self.out_of_time()
            self._end_epoch(row, due)
        unvalidated = self.history and "val_map5" not in self.history[-1] and self.df.is_val.any()
        if unvalidated and distributed.world_size() == 1:  # time ran out between epochs: validate the last one
            self._end_epoch(self.history.pop(), True)
        if self.best < 0 and distributed.is_main():  # no validation set: the last weights are the best we know
            save_best(self.out, self.eval_model.state_dict(), self.head, self.epoch, untuned(cfg))

    def _end_epoch(self, row: dict, due: bool) -> None:
        """Validate if due, keep the best, then write last.pt, the metrics and their plot."""
        if due:  # under torchrun each process embeds a share, the first tunes
            start = time.perf_counter()
            row.update(validate(self.eval_model, self.head, self.df, self.cfg, self.boxes, self.device, self.classes,
                                self.cache))
            row["val_s"] = time.perf_counter() - start
        tuned = row.pop("_tuned", None)
        self.history.append(row)
        log.info("epoch %d/%d: %s; %s", row["epoch"], self.cfg.train.epochs,
                 ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k != "epoch"), self.time_left())
        if tuned and row["val_map5"] > self.best:
            self.best = row["val_map5"]
            save_best(self.out, self.eval_model.state_dict(), self.head, self.epoch, tuned)
            log.info("new best validation MAP@5 %.4f at epoch %d (threshold %.3f; MAP@5 by policy: similarity "
                     "%.4f, share %.4f, species %.4f)", tuned["map5"], self.epoch, tuned["threshold"],
                     tuned["map5_similarity"], tuned["map5_share"], tuned["map5_species"])
        if distributed.is_main():
            save_epoch(self.out, self.state(), self.history)


def build_networks(cfg: Config, device: torch.device, labels: pd.Series, n_classes: int, n_species: int
                   ) -> tuple[ReidNet, torch.nn.Module, LevelHeads | None]:
    """The network, its margin head and the level heads (deep supervision) on `device`; the heads know each class's
    photo count (`labels`) for margins that grow for rare individuals."""
    model = ReidNet(cfg.model, n_species if cfg.loss.species_weight else 0)
    if cfg.model.sync_bn and distributed.world_size() > 1:  # timm's: torch's drops the activation of a BatchNormAct
        from timm.layers import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    if cfg.train.zero_init_last:
        log.info("zero-initialised the last norm of %d residual blocks", zero_init_last(model))
    model.to(device, memory_format=memory_format(cfg))
    counts = labels.value_counts().reindex(range(n_classes), fill_value=1).to_numpy()
    head = build_head(cfg.loss, n_classes, cfg.model.embedding_dim, counts).to(device)
    level_heads = LevelHeads(model.level_channels, cfg.loss, n_classes, cfg.model.embedding_dim,
                             counts).to(device) if cfg.loss.level_weight else None
    return model, head, level_heads


def train_loader(train_df: pd.DataFrame, cfg: Config, boxes: list[dict], device: torch.device, cache=None):
    """The training loader over (individual, species) labels and its seeded sampler (m photos per individual when
    `train.m_per_class` is set; under torchrun, this process's share of each global batch); a photo that fails in a
    worker anyway is dropped from its batch."""
    labels = np.stack([train_df.label, train_df.species_label], 1)
    ds = photo_dataset(train_df, cfg, boxes, True, labels=labels.tolist(), cache=cache, on_error="skip")
    m, world = cfg.train.m_per_class, distributed.world_size()
    batch = min(cfg.train.batch_size, len(ds) // world)
    if batch < 2:
        raise RunError(f"{len(ds)} training photos cannot fill a batch of 2 in each of {world} processes")
    sampler = SeededSampler(len(ds), cfg.train.seed, labels=train_df.label.to_numpy() if m else None, m_per_class=m,
                            rank=distributed.rank(), world=world, batch=batch)
    return make_loader(ds, cfg, device, batch, sampler, drop_last=True), sampler


def build_teacher(cfg: Config, device: torch.device) -> torch.nn.Module | None:
    """A finished run's network, frozen, for distillation (`train.teacher`); None when off."""
    if not cfg.train.teacher:
        return None
    _, teacher, _ = load_run(Path(cfg.train.teacher))
    log.info("distilling from the teacher run %s (weight %g, temperature %g)", cfg.train.teacher,
             cfg.train.distill_weight, cfg.train.distill_temperature)
    return teacher.to(device, memory_format=memory_format(cfg)).eval().requires_grad_(False)


def build_ema(cfg: Config, model: torch.nn.Module):
    """An exponential moving average of the weights (`train.ema`), validated instead of them; None when off."""
    if not cfg.train.ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=cfg.train.ema)


def train(cfg: Config, out: Path, resume: bool = False, force: bool = False) -> Path:
    """Train into the run folder `out`; returns it. Everything is checked (data, model, a resume's fit to the run)
    before the run's files are written, so a failed start leaves nothing that blocks the next try. Under torchrun
    every process trains and only the first writes the run folder."""
    distributed.check(cfg, resolve_device(cfg.train.device))  # before the run folder and the process group
    main = distributed.is_main()
    if main:
        open_run(out, resume, force)
        add_log_file(out)
    else:  # one log: the first process's
        logging.getLogger().setLevel(logging.ERROR)
    cfg.data.root = str(Path(cfg.data.root).resolve())  # the run is used later from other folders
    cfg.data.mean, cfg.data.std = (list(v) for v in input_stats(cfg))  # saved in the run: predict normalizes alike
    try:
        trainer = Trainer(cfg, out)
        split = trainer.df[["image", "individual_id", "is_val"]]
        if resume:
            state = load_checkpoint(out / "last.pt")  # read once: checked against the run, then restored
            check_resume(out, state, cfg, trainer.classes, split)
            trainer.load(out / "last.pt", state)
        if main:
            write_text(out / "config.yaml", dump_config(cfg))
            write_json(out / "labels.json", {"classes": trainer.classes, "species": trainer.species})
            write_csv(out / "split.csv", split)
        log.info("training %s on %s%s: %d steps per epoch, %d epochs", cfg.model.backbone, trainer.device,
                 f" x {distributed.world_size()} processes" if distributed.world_size() > 1 else "", trainer.steps,
                 cfg.train.epochs)
        trainer.fit()
        best = trainer.best
        distributed.barrier()  # the others wait for the first's last validation and checkpoint
        del trainer  # DDP holds the process group: released before the group, not at interpreter exit
    finally:
        distributed.stop()
    if main:
        from .report import write_report

        write_report(out)
        log.info("run finished: %s (%s)", out, f"best validation MAP@5 {best:.4f}" if best >= 0
                 else "no validation photos")
    return out

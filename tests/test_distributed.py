"""Training under torchrun: two CPU processes (gloo) against one, the files they write, kill -9 and resume."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from reid import distributed
from reid.config import load_config
from reid.data import SeededSampler

from .conftest import TINY

# 4 epochs of 5 steps: the first a head warm-up (frozen backbone: DDP's unused-parameter search), frozen norms so that
# a batch's statistics do not depend on how it is split between processes (SyncBatchNorm needs GPUs), and the rate
# scaled by the global batch (the per-process batch would halve it for two processes)
SETTINGS = [*TINY, "train.epochs=4", "train.head_warmup_epochs=1", "model.freeze_bn=true", "train.device=cpu",
            "train.lr_reference_batch=8"]
PER_PROCESS_BATCH = 4
# Both runs see the same global batches with the same augmentations; the gradients differ only in the order of float32
# sums (two means averaged against one mean of 8). Measured here: 2e-7 on the weights after 20 steps of AdamW.
TOLERANCE = 1e-5


def torchrun(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "reid", "train",
           "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (torchrun puts its trainers in process groups of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(parents.get(tree[-1], []))
    return tree


def finish(proc: subprocess.Popen, timeout: int = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def weights(run: Path) -> dict:
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    return {f"{part}.{k}": v.float() for part in ("model", "head") for k, v in state[part].items()}


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, tiny_set):
    run = tmp_path_factory.mktemp("ddp") / "two"
    finish(torchrun(run, "--data", str(tiny_set), *SETTINGS, f"train.batch_size={PER_PROCESS_BATCH}"))
    return run


def test_two_processes_end_with_the_weights_of_one_with_the_global_batch(two_process_run, tiny_set, tmp_path):
    from reid.cli import main

    runs = {}
    for batch in (2 * PER_PROCESS_BATCH, PER_PROCESS_BATCH):
        runs[batch] = tmp_path / f"one_{batch}"
        assert main(["train", "--out", str(runs[batch]), "--data", str(tiny_set), *SETTINGS,
                     f"train.batch_size={batch}"]) == 0
    two = weights(two_process_run)
    assert max_difference(weights(runs[2 * PER_PROCESS_BATCH]), two) < TOLERANCE
    # validation, its photos shared out between the two processes, scores the same weights the same
    one_val, two_val = (pd.read_csv(r / "metrics.csv")[["val_map5", "val_threshold"]]
                        for r in (runs[2 * PER_PROCESS_BATCH], two_process_run))
    assert len(two_val) == 4 and np.allclose(one_val, two_val, atol=1e-4)
    # the tolerance tells runs apart: one process with the per-process batch ends elsewhere
    assert max_difference(weights(runs[PER_PROCESS_BATCH]), two) > 100 * TOLERANCE


def test_only_the_first_process_writes_the_run_and_its_log(two_process_run):
    names = sorted(p.name for p in two_process_run.iterdir())
    assert names == ["best.pt", "config.yaml", "labels.json", "last.pt", "log.txt", "metrics.csv", "metrics.png",
                     "report.html", "split.csv", "threshold.json", "threshold.png"]
    log = (two_process_run / "log.txt").read_text()
    assert "x 2 processes" in log
    for epoch in range(1, 5):  # one line per epoch, each validated once
        assert log.count(f"epoch {epoch}/4:") == 1
        assert log.count("val_map5 ") == 4


def kill_after_first_checkpoint(run: Path, tiny_set: Path) -> int:
    """Start a two-process run, kill -9 the launcher and both trainers once last.pt exists; the epoch it holds."""
    proc = torchrun(run, "--data", str(tiny_set), *SETTINGS, f"train.batch_size={PER_PROCESS_BATCH}")
    deadline = time.time() + 180
    while not (run / "last.pt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    for pid in process_tree(proc.pid):  # no clean-up in any of them
        with contextlib.suppress(ProcessLookupError):  # gone between the listing and the kill
            os.kill(pid, signal.SIGKILL)
    proc.communicate()
    return torch.load(run / "last.pt", weights_only=True)["epoch"]


def test_kill_9_then_resume_gives_the_uninterrupted_weights(two_process_run, tiny_set, tmp_path):
    for attempt in range(3):  # a loaded machine may finish all 4 epochs before the kill lands: try again
        run = tmp_path / f"killed{attempt}"
        if kill_after_first_checkpoint(run, tiny_set) < 4:
            break
    epoch = torch.load(run / "last.pt", weights_only=True)["epoch"]
    assert 1 <= epoch < 4, "the kill came after training ended three times: nothing was resumed"
    finish(torchrun(run, "--resume"))
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 4
    assert max_difference(weights(run), weights(two_process_run)) < TOLERANCE


def test_ctrl_c_under_torchrun_prints_the_torchrun_resume_command_once(tiny_set, tmp_path):
    run = tmp_path / "interrupted"
    proc = torchrun(run, "--data", str(tiny_set), *SETTINGS, "train.epochs=50", f"train.batch_size={PER_PROCESS_BATCH}")
    deadline = time.time() + 180
    while not (run / "last.pt").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # Ctrl-C reaches torchrun, which passes it to its trainers
    out, _ = proc.communicate(timeout=120)
    epoch = torch.load(run / "last.pt", weights_only=True)["epoch"]
    line = (f"reid train: interrupted; {run}/last.pt holds epoch {epoch}. Resume with: torchrun --nproc_per_node=2 "
            f"-m reid train --out {run} --resume")
    assert out.count(line) == 1, out[-3000:]


def test_a_failing_process_stops_the_others_with_its_error(two_process_run, tiny_set):
    proc = torchrun(two_process_run, "--data", str(tiny_set), *SETTINGS)  # the run exists: the first refuses
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"run folder {two_process_run} already exists; use --resume" in out


def test_the_global_batches_are_the_same_for_any_number_of_processes():
    labels = np.repeat(np.arange(13), 3)
    for m in (0, 3):
        one = list(SeededSampler(len(labels), 5, epoch=2, labels=labels, m_per_class=m))
        for world in (2, 3):
            batch = 6 // world
            shards = [list(SeededSampler(len(labels), 5, epoch=2, labels=labels, m_per_class=m, rank=r, world=world,
                                         batch=batch)) for r in range(world)]
            assert {len(s) for s in shards} == {len(labels) // 6 * batch}
            together = [item for k in range(len(labels) // 6) for s in shards for item in s[k * batch:(k + 1) * batch]]
            assert together == one[: len(together)]  # same photos, same per-photo augmentation seeds, same order


def test_what_processes_cannot_do_alike_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, ["train.time_budget_min=5"])
    with pytest.raises(distributed.ReidError, match="train.time_budget_min"):
        distributed.check(cfg, torch.device("cpu"))
    cfg = load_config(None, ["model.sync_bn=true"])
    with pytest.raises(distributed.ReidError, match="model.sync_bn needs GPUs"):
        distributed.check(cfg, torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.check(cfg, torch.device("cpu"))  # one process: both are fine

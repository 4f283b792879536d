"""The training recipe's switches: each one changes what it should, on tiny hand-made inputs or a tiny run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reid.batch_mix import batch_side, cutmix, ricap
from reid.cli import main
from reid.config import load_config
from reid.data import SeededSampler, build_transform
from reid.losses import distill_loss
from reid.model import build_head, class_margins, zero_init_last
from reid.run import RunError
from reid.train import Trainer
from tests.conftest import TINY


def test_class_margins_grow_for_rare_individuals_and_reach_the_loss():
    m = class_margins([1, 16, 256], base=0.2, rare=0.2)
    assert m.tolist() == pytest.approx([0.4, 0.3, 0.25])
    cfg = load_config(None, ["loss.margin=0.2", "loss.margin_rare=0.2", "loss.scale=1"])
    head = build_head(cfg.loss, 3, 2, class_counts=[1, 16, 256])
    head._batch_margin = head.class_margins[torch.tensor([0, 1, 2])]
    target = head.modify_cosine_of_target_classes(torch.ones(3) * math.cos(0.1))
    assert target.tolist() == pytest.approx([math.cos(0.5), math.cos(0.4), math.cos(0.35)], abs=1e-5)
    assert head(torch.tensor([[1.0, 0.0]] * 3), torch.tensor([0, 1, 2])).item() > 0


def test_mixing_weights_sum_to_one_and_pixels_come_from_the_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 8, 8).contiguous()
    for out, parts in (cutmix(x, torch.tensor([1, 2, 3, 0]), 0.6, gen), ricap(x, 0.3, 0.6, gen)):
        assert sum(w for _, w in parts) == pytest.approx(1.0)
        assert set(out.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}
    out, parts = ricap(x, 0.5, 0.5, gen)
    assert len(parts) == 4 and all(w == pytest.approx(0.25) for _, w in parts)


def test_multiscale_draws_the_batch_side_from_its_list():
    gen = torch.Generator().manual_seed(0)
    multi = load_config(None, ["aug.multiscale=[0.5, 1.5]"]).aug
    assert {batch_side(multi, 128, gen) for _ in range(50)} == {64, 192}
    assert batch_side(load_config(None, []).aug, 128, gen) == 128


def test_m_per_class_sampler_gives_runs_of_one_individual():
    labels = np.repeat(np.arange(10), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    order = [i for i, _ in SeededSampler(len(labels), 0, labels=labels, m_per_class=4)]
    runs = np.array(labels[order][: len(order) // 4 * 4]).reshape(-1, 4)
    assert (runs == runs[:, :1]).all() and len(order) == len(labels)
    assert order == [i for i, _ in SeededSampler(len(labels), 0, labels=labels, m_per_class=4)]


def test_zero_init_last_makes_residual_blocks_identities():
    import timm

    model = timm.create_model("tinynet_e", pretrained=False).eval()  # the test_ models have no skip blocks
    assert zero_init_last(model) > 0
    block = next(b for b in model.modules() if getattr(b, "has_skip", False))
    channels = next(m for m in block.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
    x = torch.randn(2, channels, 8, 8)
    assert torch.allclose(block(x), x, atol=1e-6)


def test_distillation_is_zero_when_student_matches_teacher():
    t = torch.randn(6, 8)
    assert distill_loss(t, t, 0.1).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(torch.randn(6, 4), t, 0.1).item() > 0.01


def test_randaugment_policy_changes_photos_reproducibly():
    cfg = load_config(None, ["aug.randaugment=2", "aug.hflip=0", "aug.color=0", "aug.affine=0"])
    tf = build_transform(cfg.aug, True)
    img = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    tf.set_random_seed(5)
    a = tf(image=img)["image"]
    tf.set_random_seed(5)
    b = tf(image=img)["image"]
    plain = build_transform(load_config(None, []).aug, False)(image=img)["image"]
    assert torch.equal(a, b) and not torch.allclose(a, plain)


STILL = ["aug.hflip=0", "aug.color=0", "aug.affine=0"]  # the default's jitters off: only the switch under test acts
PHOTO = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)


def test_camera_faults_change_photos_only_when_switched_on():
    plain = build_transform(load_config(None, STILL).aug, False)(image=PHOTO)["image"]
    steps = [type(t).__name__ for t in build_transform(load_config(None, STILL).aug, True).transforms]
    assert "OneOf" not in steps  # off: not even a step that draws random numbers
    tf = build_transform(load_config(None, [*STILL, "aug.degrade=1"]).aug, True)
    outs = []
    for seed in (5, 5, 6):
        tf.set_random_seed(seed)
        outs.append(tf(image=PHOTO)["image"])
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], plain) and not torch.equal(outs[0], outs[2])


def test_grey_switch_makes_the_three_channels_equal_and_is_absent_when_off():
    off = build_transform(load_config(None, STILL).aug, True)
    assert "ToGray" not in [type(t).__name__ for t in off.transforms]
    norm = next(t for t in off.transforms if type(t).__name__ == "Normalize")  # undo it with its own statistics
    mean, std = torch.tensor(norm.mean)[:, None, None], torch.tensor(norm.std)[:, None, None]
    for switch, grey in (("aug.gray=0", False), ("aug.gray=1", True)):
        rgb = build_transform(load_config(None, [*STILL, switch]).aug, True)(image=PHOTO)["image"] * std + mean
        assert torch.allclose(rgb[0], rgb[1], atol=1e-5) == grey and torch.allclose(rgb[1], rgb[2], atol=1e-5) == grey


def test_jitter_strength_scales_the_affine_and_colour_ranges_and_zero_leaves_the_photo_as_it_is():
    on = ["aug.hflip=0", "aug.color=1", "aug.affine=1"]
    scaled = load_config(None, [*on, "aug.affine_strength=2", "aug.color_strength=0.5"]).aug
    steps = {type(t).__name__: t for t in build_transform(scaled, True)}
    affine, colour = steps["Affine"], steps["ColorJitter"]
    assert affine.rotate == (-24, 24) and affine.scale["x"] == pytest.approx((0.7, 1.3))
    assert colour.brightness == pytest.approx((0.85, 1.15)) and colour.hue == pytest.approx((-0.025, 0.025))
    plain = build_transform(load_config(None, STILL).aug, False)(image=PHOTO)["image"]
    none = load_config(None, [*on, "aug.affine_strength=0", "aug.color_strength=0"]).aug
    assert torch.allclose(build_transform(none, True)(image=PHOTO)["image"], plain, atol=1e-4)
    assert not torch.allclose(build_transform(load_config(None, on).aug, True)(image=PHOTO)["image"], plain, atol=1e-4)


@pytest.mark.parametrize("switches", [
    ["aug.degrade=0.5", "aug.gray=0.2", "aug.affine_strength=1.5", "aug.color_strength=0.5", "model.stripes=2"],
    ["aug.mixup=0.4", "aug.cutmix=1.0", "aug.ricap=0.3", "aug.multiscale=[0.75, 1.25]", "aug.randaugment=1"],
    ["loss.head=subcenter", "loss.margin_rare=0.1", "loss.label_smoothing=0.1", "loss.species_weight=0.3",
     "loss.pair_weight=0.5", "train.m_per_class=4", "loss.level_weight=0.5"],
    ["train.optimizer=sgd", "train.lr_reference_batch=64", "train.zero_init_last=true", "train.ema=0.9",
     "train.accumulate=2", "train.schedule=step"],
])
def test_switches_train_end_to_end(tmp_path, tiny_set, switches):
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), f"data.root={tiny_set}", *TINY, "train.epochs=1", *switches]) == 0
    assert (run / "best.pt").is_file()


def test_level_heads_are_checkpointed_and_restored(tmp_path, tiny_set):
    from reid.files import load_checkpoint

    run, overrides = tmp_path / "r", [f"data.root={tiny_set}", *TINY, "train.epochs=1", "loss.level_weight=0.5"]
    assert main(["train", "--out", str(run), *overrides]) == 0
    saved = load_checkpoint(run / "last.pt")["level_heads"]
    trainer = Trainer(load_config(None, overrides), tmp_path / "again")
    fresh = {k: v.clone() for k, v in trainer.level_heads.state_dict().items()}
    trainer.load(run / "last.pt")
    restored = trainer.level_heads.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in saved.items())
    assert any(not torch.equal(fresh[k], v) for k, v in saved.items())  # trained: the load changed something
    plain = tmp_path / "plain"
    assert main(["train", "--out", str(plain), *overrides[:-1]]) == 0
    with pytest.raises(RunError, match="trained without loss.level_weight"):
        trainer.load(plain / "last.pt")
    species = Trainer(load_config(None, [*overrides[:-1], "loss.species_weight=0.3"]), tmp_path / "species")
    with pytest.raises(RunError, match="does not fit the run this config builds"):  # one line, not torch's traceback
        species.load(plain / "last.pt")


def test_adabound_and_distillation_from_a_teacher(tmp_path, tiny_set):
    pytest.importorskip("adabound")
    teacher = tmp_path / "teacher"
    assert main(["train", "--out", str(teacher), f"data.root={tiny_set}", *TINY, "train.epochs=1"]) == 0
    student = tmp_path / "student"
    assert main(["train", "--out", str(student), f"data.root={tiny_set}", *TINY, "train.epochs=1",
                 "train.optimizer=adabound", f"train.teacher={teacher}", "train.distill_weight=1.0",
                 "model.embedding_dim=16"]) == 0
    assert (student / "best.pt").is_file()


def test_time_budget_stops_training_and_validates(tmp_path, tiny_set):
    import pandas as pd

    run = tmp_path / "r"
    assert main(["train", "--out", str(run), f"data.root={tiny_set}", *TINY, "train.epochs=1000",
                 "train.val_every=1000", "train.time_budget_min=0.02"]) == 0
    metrics = pd.read_csv(run / "metrics.csv")
    assert len(metrics) < 1000 and metrics.val_map5.notna().iloc[-1] and (run / "best.pt").is_file()


def test_loss_terms_follow_the_switches_their_weights_and_the_mixing():
    from reid.losses import Batch, loss_terms, total_loss
    from reid.model import LevelHeads, ReidNet

    tiny = ["model.backbone=test_efficientnet", "model.out_indices=[1, 2]", "model.embedding_dim=16"]
    assert [t.name for t in loss_terms(load_config(None, tiny), ReidNet(load_config(None, tiny).model),
                                       build_head(load_config(None, tiny).loss, 4, 16))] == ["margin"]
    cfg = load_config(None, [*tiny, "loss.level_weight=0.5", "loss.species_weight=0.3", "loss.pair_weight=0.2"])
    torch.manual_seed(0)
    model = ReidNet(cfg.model, n_species=3)
    head = build_head(cfg.loss, 4, 16)
    levels = LevelHeads(model.level_channels, cfg.loss, 4, 16)
    terms = loss_terms(cfg, model, head, levels)
    assert [(t.name, t.weight, t.mixed) for t in terms] == [("margin", 1.0, True), ("levels", 0.5, True),
                                                             ("species", 0.3, True), ("pairs", 0.2, False)]
    x = torch.rand(8, 3, 64, 64)
    pooled = model.levels(x)
    labels = torch.tensor([[0, 0], [0, 0], [1, 1], [1, 1], [2, 2], [2, 2], [3, 1], [3, 1]])
    batch = Batch(x, model.embed(pooled), pooled, labels)
    perm = torch.tensor([1, 0, 3, 2, 5, 4, 7, 6]).roll(2)
    got = total_loss(terms, batch, [(None, 0.7), (perm, 0.3)])
    expect = sum(t.weight * (0.7 * t.fn(batch, labels) + 0.3 * t.fn(batch, labels[perm]) if t.mixed
                             else t.fn(batch, labels)) for t in terms)
    assert torch.allclose(got, expect, atol=1e-5) and got > 0
    species = terms[2].fn(batch, labels)
    assert torch.allclose(species, torch.nn.functional.cross_entropy(model.species_head(batch.emb), labels[:, 1]))
    smooth = build_head(load_config(None, [*tiny, "loss.label_smoothing=0.3"]).loss, 4, 16)
    smooth.load_state_dict(head.state_dict())
    assert not torch.allclose(smooth(batch.emb, labels[:, 0]), head(batch.emb, labels[:, 0]))


def test_optimisation_switches_change_the_rate_the_steps_and_the_validated_weights(tmp_path, tiny_set):
    from reid.optim import build_optimizer

    tiny = [f"data.root={tiny_set}", *TINY]
    cfg = load_config(None, [*tiny, "train.lr_reference_batch=64"])
    model = torch.nn.Linear(3, 3)
    opt = build_optimizer(cfg, model, torch.nn.Linear(3, 3), model, batch_size=16)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.003 * 16 / 64)  # the linear scaling rule
    trainer = Trainer(load_config(None, [*tiny, "train.accumulate=2", "train.ema=0.5"]), tmp_path / "r")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    steps = []
    real = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: steps.append(1) or real(*a, **k)
    batches = iter(trainer.loader)
    gen = torch.Generator().manual_seed(0)
    trainer._step(next(batches), gen, 0)
    assert not steps  # the first of two accumulated batches does not step
    trainer._step(next(batches), gen, 1)
    assert len(steps) == 1
    moved = [not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True)]
    assert any(moved)
    # the moving average sits between the first weights and the trained ones: (0.5 * before + 0.5 * after)
    conv = [n for n, _ in trainer.model.named_parameters()].index("backbone.conv_stem.weight")
    ema = dict(trainer.ema.module.named_parameters())["backbone.conv_stem.weight"]
    after = list(trainer.model.parameters())[conv]
    assert torch.allclose(ema, 0.5 * before[conv] + 0.5 * after, atol=1e-6)


def test_gradient_clipping_bounds_the_norm_the_optimizer_steps_with(tmp_path, tiny_set):
    norms = {}
    for clip in (0.0, 1e-3):
        cfg = load_config(None, [f"data.root={tiny_set}", *TINY, f"train.grad_clip={clip}"])
        trainer = Trainer(cfg, tmp_path / "r")
        params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
        real = trainer.optimizer.step

        def step(*args, real=real, params=params, clip=clip, **kwargs):  # the gradient as the optimizer sees it
            norms[clip] = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
            return real(*args, **kwargs)

        trainer.optimizer.step = step
        trainer._step(next(iter(trainer.loader)), torch.Generator().manual_seed(0), 0)
    assert norms[1e-3] <= 1e-3 * 1.001 and norms[0.0] > 10 * 1e-3  # unclipped, the same batch's gradient is larger


def test_random_erasing_replaces_patches_only_when_switched_on():
    plain = build_transform(load_config(None, STILL).aug, False)(image=PHOTO)["image"]
    kept = build_transform(load_config(None, [*STILL, "aug.erasing=0"]).aug, True)(image=PHOTO)["image"]
    assert torch.allclose(kept, plain, atol=1e-5)
    tf = build_transform(load_config(None, [*STILL, "aug.erasing=1"]).aug, True)
    for seed in range(5):
        tf.set_random_seed(seed)
        changed = (tf(image=PHOTO)["image"] - plain).abs().amax(0) > 1e-4  # (H, W): pixels inside a hole
        assert 0.005 < changed.float().mean() < 0.3  # one to three holes of 10-30 % of each side


def test_box_file_choice_and_margin_jitter_follow_the_seed(tmp_path):
    import cv2

    from reid.data import PhotoDataset

    ramp = np.tile(np.linspace(0, 255, 200, dtype=np.uint8)[None, :, None], (100, 1, 3))  # brightness = column
    cv2.imwrite(str(tmp_path / "p.png"), ramp)
    fin, body = {"p.png": (80.0, 30.0, 120.0, 70.0)}, {"p.png": (0.0, 0.0, 200.0, 100.0)}

    def mean(ds, seed):
        return float(ds[(0, seed)][0].mean())

    def dataset(probs, jitter):
        return PhotoDataset([str(tmp_path / "p.png")], [0], [fin, body], ["p.png"], 16, margin=0.2, jitter=jitter,
                            box_probs=probs)

    assert {round(mean(dataset([1, 0], 0.0), s), 3) for s in range(6)} == {round(mean(dataset([1, 0], 0.0), 0), 3)}
    assert abs(mean(dataset([1, 0], 0.0), 0) - 255 / 2) < 3 and abs(mean(dataset([0, 1], 0.0), 0) - 255 / 2) < 3
    narrow = dataset([1, 0], 0.0)[(0, 0)][0].astype(float)
    whole = dataset([0, 1], 0.0)[(0, 0)][0].astype(float)
    assert np.ptp(narrow[8, :, 0]) < 0.4 * np.ptp(whole[8, :, 0])  # the fin box spans a fifth of the ramp
    jittered = dataset([1, 0], 0.2)
    spans = {round(float(np.ptp(jittered[(0, s)][0][8, :, 0].astype(float))), 1) for s in range(6)}
    assert len(spans) > 1  # the margin varies with the seed
    assert np.array_equal(jittered[(0, 3)][0], jittered[(0, 3)][0])  # and one seed crops alike in any worker
    mixed = dataset([0.5, 0.5], 0.0)
    assert len({round(float(np.ptp(mixed[(0, s)][0][8, :, 0].astype(float)))) for s in range(12)}) == 2


def test_schedule_warms_up_linearly_then_decays_by_cosine_or_by_steps_or_by_the_clock():
    from reid.optim import lr_lambda

    cosine, step = lr_lambda(110, 10, "cosine"), lr_lambda(110, 10, "step")
    assert [cosine(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # warmup, the same for both
    assert [step(s) for s in (0, 9)] == pytest.approx([0.1, 1.0])
    assert [cosine(s) for s in (10, 60, 110)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-9)
    assert [step(s) for s in (10, 69, 70, 94, 95, 110)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    done = [0.0]
    clock = lr_lambda(110, 0, "cosine", progress=lambda: done[0])  # a time budget: the share of time spent rules
    assert clock(100) == pytest.approx(1.0)
    done[0] = 0.5
    assert clock(1) == pytest.approx(0.5)


def test_sync_bn_converts_every_norm_and_keeps_the_network_when_several_processes_train(monkeypatch):
    from reid import distributed
    from reid.train import build_networks

    cfg = load_config(None, ["model.backbone=test_efficientnet", "model.embedding_dim=8", "model.sync_bn=true"])
    labels = __import__("pandas").Series([0, 1, 1])
    norms = lambda m: {type(x).__name__ for x in m.modules() if "Norm" in type(x).__name__}  # noqa: E731
    torch.manual_seed(0)
    alone, _, _ = build_networks(cfg, torch.device("cpu"), labels, 2, 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    torch.manual_seed(0)
    shared, _, _ = build_networks(cfg, torch.device("cpu"), labels, 2, 1)
    assert norms(alone) == {"BatchNormAct2d", "BatchNorm1d"} and norms(shared) == {"SyncBatchNormAct", "SyncBatchNorm"}
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # the same weights compute the same function: the activations inside the norms are kept
        torch.testing.assert_close(shared.eval()(x), alone.eval()(x))

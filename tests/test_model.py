import math

import numpy as np
import pytest
import torch
from timm.layers import DropPath

from reid.config import ConfigError, load_config
from reid.model import GeM, LevelHeads, ModelError, ReidNet, build_head
from reid.optim import param_groups
from reid.weights import WeightsError


def test_gem_matches_its_formula():
    x = torch.rand(2, 3, 4, 5) + 0.1
    p = 2.5
    expect = (x.pow(p).mean(dim=(2, 3))).pow(1 / p)
    assert torch.allclose(GeM(p)(x), expect, atol=1e-6)
    assert torch.allclose(GeM(1.0)(x), x.mean(dim=(2, 3)), atol=1e-6)  # p=1 is average pooling
    assert GeM(3.0).p.requires_grad


def test_stripes_pool_each_horizontal_band_and_ignore_a_left_right_flip():
    x = torch.rand(2, 3, 6, 5) + 0.1
    gem = GeM(2.0, stripes=3)
    bands = [GeM(2.0)(x[:, :, 2 * i:2 * i + 2]) for i in range(3)]  # (N, C) each
    assert torch.allclose(gem(x), torch.stack(bands, dim=2).flatten(1), atol=1e-6)  # channel-major, as flattened
    assert torch.allclose(gem(x.flip(-1)), gem(x), atol=1e-6)
    assert not torch.allclose(gem(x.flip(-2)), gem(x), atol=1e-3)  # top and bottom are kept apart


@pytest.mark.parametrize("pooling", ["gem", "avg"])
def test_stripes_multiply_the_pooled_width(pooling):
    cfg = load_config(None, ["model.backbone=test_efficientnet", "model.out_indices=[1, 2, 3]",
                             "model.embedding_dim=8", "model.stripes=2", f"model.pooling={pooling}"])
    model = ReidNet(cfg.model).eval()
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 8)
    assert model.neck[1].in_features == 2 * sum(model.backbone.feature_info.channels())
    with pytest.raises(ConfigError, match="model.stripes"):
        load_config(None, ["model.stripes=0"])


def test_multi_level_model_output_shape():
    cfg = load_config(None, ["model.backbone=test_efficientnet", "model.out_indices=[1, 2, 3]",
                             "model.embedding_dim=24"])
    model = ReidNet(cfg.model).eval()
    assert len(model.pools) == 3
    assert model(torch.rand(3, 3, 64, 64)).shape == (3, 24)
    assert model.neck[1].in_features == sum(model.backbone.feature_info.channels())


def test_level_heads_send_a_loss_to_each_level_of_its_own_and_leave_the_embedding_alone():
    cfg = load_config(None, ["model.backbone=test_efficientnet", "model.out_indices=[1, 2, 3]",
                             "model.embedding_dim=8", "model.stripes=2"])
    torch.manual_seed(0)
    model = ReidNet(cfg.model).train()
    x, labels = torch.rand(6, 3, 64, 64), torch.tensor([0, 0, 1, 1, 2, 2])
    pooled = model.levels(x)
    assert [p.shape[1] for p in pooled] == model.level_channels
    assert torch.allclose(model.embed(pooled), model(x), atol=1e-5)  # BatchNorm in train mode: same batch, same out
    heads = LevelHeads(model.level_channels, cfg.loss, 3, 4)
    assert len(heads.heads) == 3 and heads.necks[0][0].in_features == model.level_channels[0]
    levels = [p.detach().requires_grad_() for p in pooled]
    loss = heads(levels, labels)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad.abs().sum() > 0 for p in levels)


def test_arcface_margin_is_radians_in_config_and_converted():
    cfg = load_config(None, ["loss.margin=0.3", "loss.scale=15"])
    head = build_head(cfg.loss, num_classes=10, embedding_dim=8)
    assert head.margin == pytest.approx(0.3)  # the library stores radians after converting from degrees
    assert head.scale == 15
    sub = build_head(load_config(None, ["loss.head=subcenter", "loss.sub_centers=2"]).loss, 10, 8)
    assert sub.W.shape == (8, 20) and sub.margin == pytest.approx(0.3)


def test_arcface_logit_has_the_margin():
    cfg = load_config(None, ["loss.margin=0.5", "loss.scale=1"])
    head = build_head(cfg.loss, num_classes=2, embedding_dim=2)
    with torch.no_grad():
        head.W.copy_(torch.eye(2))
    angle = 0.3
    emb = torch.tensor([[math.cos(angle), math.sin(angle)]])
    logits = head.get_logits(emb)  # no margin here; the loss adds it to the target class
    assert logits[0, 0].item() == pytest.approx(math.cos(angle), abs=1e-5)
    target = head.modify_cosine_of_target_classes(torch.tensor([math.cos(angle)]))
    assert target.item() == pytest.approx(math.cos(angle + 0.5), abs=1e-5)


def test_label_smoothing_switch():
    head = build_head(load_config(None, ["loss.label_smoothing=0.1"]).loss, 5, 4)
    assert head.cross_entropy.label_smoothing == pytest.approx(0.1)


def test_no_weight_decay_on_bias_and_norm():
    cfg = load_config(None, ["model.backbone=test_efficientnet", "model.out_indices=[2]"])
    model, head = ReidNet(cfg.model), build_head(cfg.loss, 3, cfg.model.embedding_dim)
    decay, no_decay, centres = param_groups(model, head, 1e-3, 0.05, 10)
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0 and centres["lr"] == pytest.approx(1e-2)


def test_pretrained_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config(None, ["model.backbone=test_efficientnet", "model.pretrained=true"])
    with pytest.raises(ModelError, match="model.weights=.*model.pretrained=false"):
        ReidNet(cfg.model)


def test_local_weight_file_is_loaded(tmp_path):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("test_efficientnet", pretrained=False)
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    cfg = load_config(None, ["model.backbone=test_efficientnet", "model.out_indices=[1]",
                             f"model.weights={tmp_path / 'w.safetensors'}"])
    model = ReidNet(cfg.model)
    assert torch.equal(model.backbone.conv_stem.weight, source.conv_stem.weight)
    with pytest.raises(WeightsError, match="does not exist"):
        ReidNet(load_config(None, ["model.weights=/no/such/file.pt"]).model)


def test_unknown_backbone_names_the_key():
    with pytest.raises(ModelError, match="model.backbone"):
        ReidNet(load_config(None, ["model.backbone=efficientnet_b99"]).model)


def test_stochastic_depth_switch_skips_blocks_in_training_only():
    cfg = load_config(None, ["model.backbone=tinynet_e", "model.drop_path_rate=0.5", "model.embedding_dim=8"])
    model = ReidNet(cfg.model)  # tinynet_e: test_efficientnet has no residual blocks to skip
    assert max(m.drop_prob for m in model.modules() if isinstance(m, DropPath)) > 0
    x = torch.rand(4, 3, 64, 64)
    torch.manual_seed(0)
    a, b = model(x), model(x)
    assert not torch.allclose(a, b)  # blocks dropped at random in training
    model.eval()
    assert torch.allclose(model(x), model(x))
    plain = ReidNet(load_config(None, ["model.backbone=tinynet_e"]).model)
    assert not any(isinstance(m, DropPath) and m.drop_prob > 0 for m in plain.modules())


def test_channels_last_layout_embeds_the_same_photos_alike():
    from reid.inference import embed, memory_format

    cfg = load_config(None, ["model.backbone=test_efficientnet", "model.embedding_dim=8"])
    assert memory_format(cfg) == torch.channels_last  # the default, on CPU too
    assert memory_format(load_config(None, ["train.channels_last=false"])) == torch.contiguous_format
    model = ReidNet(cfg.model).eval()
    batches = [{"images": torch.rand(3, 3, 64, 64), "indices": torch.arange(3)}]
    plain, ok = embed(model, batches, torch.device("cpu"))
    model.to(memory_format=torch.channels_last)
    assert model.backbone.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    fast, _ = embed(model, batches, torch.device("cpu"), layout=torch.channels_last)
    assert ok.all() and fast.shape == (3, 8)
    np.testing.assert_allclose(fast, plain, atol=1e-4)


def test_multi_size_tta_averages_the_normalized_embeddings_at_each_side():
    from reid.inference import embed, embed_batch, resize

    x = torch.rand(2, 3, 64, 64)
    assert resize(x, 1.0) is x and resize(x, 0.875).shape[-2:] == (56, 56) and resize(x, 1.125).shape[-1] == 72
    model = ReidNet(load_config(None, ["model.backbone=test_efficientnet", "model.embedding_dim=8"]).model).eval()
    unit = lambda e: torch.nn.functional.normalize(e, dim=1)  # noqa: E731
    with torch.no_grad():
        one = unit(unit(model(x)) + unit(model(torch.flip(x, dims=[3]))))  # flip TTA alone, as before the switch
        sides = [unit(model(torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", antialias=s < 64)))
                 for s in (56, 64, 72)]
        torch.testing.assert_close(embed_batch(model, x), one)
        torch.testing.assert_close(embed_batch(model, x, False, (0.875, 1.0, 1.125)), unit(sum(sides)))
    batches = [{"images": x, "indices": torch.arange(2)}]
    single, _ = embed(model, batches, torch.device("cpu"), flip_tta=False)
    multi, _ = embed(model, batches, torch.device("cpu"), flip_tta=False, scales=[0.875, 1.0, 1.125])
    np.testing.assert_allclose(multi, unit(sum(sides)).numpy(), atol=1e-6)
    assert np.abs(multi - single).max() > 1e-4  # the other sides change the embedding


def test_five_crop_tta_averages_the_photo_and_its_five_crops_folded_into_one_batch():
    from reid.inference import embed_batch, views

    x = torch.rand(2, 3, 64, 64)
    v = views(x, True)
    assert views(x, False) is x and v.shape == (12, 3, 64, 64) and torch.equal(v[:2], x)
    back = lambda c: torch.nn.functional.interpolate(c, size=(64, 64), mode="bilinear", align_corners=False)  # noqa: E731
    torch.testing.assert_close(v[2:4], back(x[..., :56, :56]))  # top left, 7/8 of each side
    torch.testing.assert_close(v[8:10], back(x[..., 8:, 8:]))  # bottom right
    torch.testing.assert_close(v[10:12], back(x[..., 4:60, 4:60]))  # centre
    model = ReidNet(load_config(None, ["model.backbone=test_efficientnet", "model.embedding_dim=8"]).model).eval()
    unit = lambda e: torch.nn.functional.normalize(e, dim=1)  # noqa: E731
    sizes = []
    model.register_forward_hook(lambda mod, args, out: sizes.append(len(args[0])))
    with torch.no_grad():
        want = unit(sum(unit(model(c)) + unit(model(torch.flip(c, dims=[3]))) for c in v.split(2)))
        sizes.clear()
        got = embed_batch(model, x, five_crop=True)
        assert sizes == [12, 12]  # the six views in one forward pass, their mirrors in another
        torch.testing.assert_close(got, want)
        assert (got - embed_batch(model, x)).abs().max() > 1e-3  # the crops change the embedding


def test_onnx_export_with_five_crop_tta_fits_any_batch_size(tmp_path):
    import onnxruntime as ort

    from reid.export import Embedder
    from reid.inference import embed_batch

    model = ReidNet(load_config(None, ["model.backbone=test_efficientnet", "model.embedding_dim=8"]).model).eval()
    path = tmp_path / "m.onnx"
    torch.onnx.export(Embedder(model, True, True), (torch.rand(2, 3, 64, 64),), str(path), input_names=["images"],
                      opset_version=17, dynamo=False, dynamic_axes={"images": {0: "batch"}})
    x = torch.rand(3, 3, 64, 64)  # another batch size than the export's
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, embed_batch(model, x, True, five_crop=True).numpy(), atol=1e-4)


def test_band_pooling_for_onnx_export_equals_adaptive_pooling(monkeypatch):
    from reid.model import stripe_mean

    x = torch.rand(2, 3, 7, 5)  # 7 rows in 4 bands: uneven, overlapping as adaptive pooling makes them
    expect = stripe_mean(x, 4)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    assert torch.allclose(stripe_mean(x, 4), expect, atol=1e-6)

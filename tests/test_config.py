import pytest

from reid.config import ConfigError, dump_config, load_config, parse_override


def test_defaults_and_overrides_apply():
    cfg = load_config(None, ["train.epochs=3", "model.out_indices=[2, 3]", "loss.margin=0.5", "train.lr=1"])
    assert cfg.train.epochs == 3 and cfg.model.out_indices == [2, 3]
    assert cfg.loss.margin == 0.5 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("override, key", [
    ("train.epoch=3", "train.epoch"), ("trian.epochs=3", "trian"), ("train.epochs=three", "train.epochs"),
    ("train.lr=-1", "train.lr"), ("loss.head=cosface", "loss.head"), ("model.out_indices=3", "model.out_indices"),
    ("train.amp=1", "train.amp"), ("split.fold=7", "split.fold"), ("predict.tta_scales=[1, 0.1]", "predict.tta_scales"),
])
def test_bad_key_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_yaml_file_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 4\nmodel:\n  backbone: tinynet_e\n")
    cfg = load_config(path)
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg and cfg.model.backbone == "tinynet_e"


def test_unsafe_yaml_is_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("train: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_override_syntax():
    assert parse_override("a.b=[1, 2]") == {"a": {"b": [1, 2]}}
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.epochs")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


def test_a_retired_key_loads_at_its_old_default_and_is_refused_otherwise(tmp_path):
    path = tmp_path / "config.yaml"  # as an earlier version saved it in a run folder
    path.write_text("model:\n  pyramid: false\n  level_norm: false\n  output_stride: 32\n  stripes: 2\n"
                    "aug:\n  progressive: 0.0\n  perspective: 0.0\npredict:\n  gallery: photo\n")
    assert load_config(path) == load_config(None, ["model.stripes=2"])
    path.write_text("model:\n  output_stride: 16\n")
    with pytest.raises(ConfigError, match=r"'model\.output_stride' is no longer supported \(model\.output_stride=16\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'aug\.perspective' is no longer supported"):
        load_config(None, ["aug.perspective=0.5"])
    with pytest.raises(ConfigError, match="unknown config key 'model.pyramids'"):
        load_config(None, ["model.pyramids=false"])

import argparse
import copy

import pytest
import yaml

from utils.config import (
    DEFAULTS,
    Config,
    ConfigError,
    add_config_args,
    differences,
    load_config,
    rules,
    save_config,
    with_defaults,
)

REPO = DEFAULTS.parent.parent


def write(path, text):
    path.write_text(text)
    return path


def test_defaults_load_with_attribute_access():
    cfg = load_config()
    raw = yaml.safe_load(open(DEFAULTS))
    assert isinstance(cfg, Config) and isinstance(cfg.optim, Config)
    assert cfg.optim.blr == raw["optim"]["blr"] == 1.5e-4
    assert cfg.data.batch_size == raw["data"]["batch_size"]
    assert cfg.model.vit.init is None
    with pytest.raises(AttributeError, match="nope"):
        cfg.nope
    cfg.optim.lr = 2.0  # attribute assignment writes the key
    assert cfg["optim"]["lr"] == 2.0


def test_run_config_and_overrides(tmp_path):
    f = write(tmp_path / "run.yaml", "optim:\n  lr: 1e-4\n  epochs: 3\ndata:\n  skip_bad: true\n")
    cfg = load_config(f, ["optim.lr=2e-4", "data.batch_size=8", "optim.betas=[0, 0.99]",
                          "train.resume=auto", "model.vit.init=/x/mae.pth"])
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)  # --set wins over the file
    assert cfg.optim.epochs == 3 and cfg.data.skip_bad is True and cfg.data.batch_size == 8
    assert cfg.optim.betas == [0.0, 0.99] and isinstance(cfg.optim.betas[0], float)
    assert cfg.train.resume == "auto" and cfg.model.vit.init == "/x/mae.pth"
    assert cfg.optim.min_lr == 1e-6  # untouched keys keep their default


def test_float_from_yaml11_string(tmp_path):
    # YAML 1.1 (PyYAML) reads "1e-4" (no dot) as a string; a float key takes it
    assert yaml.safe_load("a: 1e-4")["a"] == "1e-4"
    cfg = load_config(write(tmp_path / "a.yaml", "optim:\n  lr: 1e-4\n  min_lr: 3\n"))
    assert cfg.optim.lr == 1e-4 and cfg.optim.min_lr == 3.0 and isinstance(cfg.optim.min_lr, float)


@pytest.mark.parametrize("text, key", [
    ("optim:\n  lrr: 0.1\n", "optim.lrr"),
    ("nonsense: 1\n", "nonsense"),
    ("model:\n  vit:\n    depht: 2\n", "model.vit.depht"),
])
def test_unknown_key_names_key_and_file(tmp_path, text, key):
    f = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert repr(key) in str(e.value) and str(f) in str(e.value)


def test_unknown_key_suggests_close_match(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        load_config(overrides=["optim.lrr=1"])


@pytest.mark.parametrize("override, key", [
    ("data.batch_size=8.5", "data.batch_size"),      # float for int
    ("data.batch_size=true", "data.batch_size"),     # bool is not an int
    ("data.skip_bad=1", "data.skip_bad"),            # int is not a bool
    ("data.skip_bad=yes please", "data.skip_bad"),
    ("optim.lr=fast", "optim.lr"),                   # non-numeric string for float
    ("optim.betas=0.9", "optim.betas"),              # scalar for list
    ("optim.betas=[0.9, x]", "optim.betas[1]"),      # list item of the wrong type
    ("model.decoder.lora.target_modules=[1]", "model.decoder.lora.target_modules[0]"),
    ("run_name=[a]", "run_name"),                    # list for str
    ("optim=3", "optim"),                            # scalar for a section
    ("optim.lr.x=3", "optim.lr"),                    # section for a scalar
    ("optim.epochs=null", "optim.epochs"),           # null only where the default is null
])
def test_wrong_type_is_error_naming_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert repr(key) in str(e.value) and "--set" in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["optim.lr"])
    with pytest.raises(ConfigError, match="bad key"):
        load_config(overrides=["optim..lr=1"])


def test_base_inheritance(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "a.yaml", "optim:\n  lr: 0.1\n  epochs: 5\nseed: 1\n")
    write(tmp_path / "b.yaml", "optim:\n  epochs: 7\n")
    child = write(tmp_path / "sub" / "c.yaml", "base: [../a.yaml, ../b.yaml]\nseed: 3\n")
    cfg = load_config(child, ["optim.lr=0.2"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.seed) == (0.2, 7, 3)  # later layers win
    single = write(tmp_path / "d.yaml", "base: a.yaml\n")
    assert load_config(single).optim.epochs == 5
    # an error inside a base names the base file
    write(tmp_path / "e.yaml", "optim:\n  epochs: many\n")
    with pytest.raises(ConfigError, match="e.yaml.*'optim.epochs'"):
        load_config(write(tmp_path / "f.yaml", "base: e.yaml\n"))


def test_circular_base_and_missing_file(tmp_path):
    write(tmp_path / "x.yaml", "base: y.yaml\n")
    write(tmp_path / "y.yaml", "base: x.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_save_config_round_trip(tmp_path):
    cfg = load_config(overrides=["optim.lr=3e-4", "run_name=demo"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg and again.optim.lr == 3e-4 and again.run_name == "demo"
    assert yaml.safe_load(out.read_text())["optim"]["lr"] == 3e-4


def test_deepcopy_is_independent():
    cfg = load_config()
    other = copy.deepcopy(cfg)
    other.optim.lr = 1.0
    assert isinstance(other.optim, Config) and cfg.optim.lr == 0.0


def test_cli_args(tmp_path):
    parser = add_config_args(argparse.ArgumentParser())
    f = write(tmp_path / "r.yaml", "seed: 5\n")
    args = parser.parse_args(["--config", str(f), "--set", "optim.lr=1e-4", "data.batch_size=8",
                              "--set", "seed=6"])
    assert args.set == ["optim.lr=1e-4", "data.batch_size=8", "seed=6"]
    cfg = load_config(args.config, args.set)
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.seed) == (1e-4, 8, 6)
    assert parser.parse_args([]).set == []


def test_with_defaults_fills_keys_newer_than_a_saved_section():
    """A checkpoint written before model.text.dropout existed still builds, with the default; a key
    the defaults no longer have is an error naming the checkpoint."""
    saved = load_config().model.to_dict()
    del saved["text"]["dropout"]
    saved["vit"]["depth"] = 3
    model = with_defaults("model", saved, "old.pth (its stored config)")
    assert model.text.dropout == 0.1 and model.vit.depth == 3
    saved["vit"]["registers"] = 4
    with pytest.raises(
        ConfigError, match=r"old\.pth \(stored\): unknown config key 'model\.vit\.registers'"
    ):
        with_defaults("model", saved, "old.pth (stored)")


def test_differences_lists_changed_and_one_sided_keys():
    a = {"vit": {"depth": 4, "stem": "conv"}, "lr": 1.0, "only_a": 1}
    b = {"vit": {"depth": 3, "stem": "conv"}, "lr": 1.0, "only_b": {"x": 2}}
    assert differences(a, b) == [
        ("vit.depth", 4, 3),
        ("only_a", 1, None),
        ("only_b", None, {"x": 2}),
    ]
    assert differences(load_config().to_dict(), load_config().to_dict()) == []


def leaf_keys(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and v:
            yield from leaf_keys(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_every_key_has_a_rule_and_the_shipped_configs_keep_them():
    assert sorted(rules()) == sorted(leaf_keys(yaml.safe_load(open(DEFAULTS))))
    for path in sorted((REPO / "configs").glob("*.yaml")):
        if path.name != "rules.yaml":
            load_config(None if path == DEFAULTS else path)


@pytest.mark.parametrize("override, says", [
    ("optim.lr=-1e-4", "optim.lr=-0.0001 must be >= 0"),  # was: the blr-derived lr, silently
    ("optim.accum_iter=0", "optim.accum_iter=0 must be >= 1"),  # was: lr 0
    ("train.nonfinite=sotp", "train.nonfinite='sotp' must be one of skip, stop"),  # was: skip
    ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
    ("device=cpux", "device='cpux' must be auto, cpu, mps, cuda or cuda:N"),
    ("data.random_resized_crop=[0.9, 0.2]", "random_resized_crop=[0.9, 0.2] must be in ascending"),
    ("data.random_resized_crop=[0.5, 1.5]", "each item must be in (0, 1]"),
    ("data.random_resized_crop=[0.5]", "must be a list of 2 items"),
    ("model.mae.mask_ratio=1", "model.mae.mask_ratio=1.0 must be in (0, 1)"),
    ("optim.betas=[0.9, 1]", "optim.betas=[0.9, 1.0] each item must be in [0, 1)"),
    ("eval.labeler=chexpert", "eval.labeler='chexpert' must be one of rule, chexbert"),
    ("run_name=", "run_name='' must not be empty"),
    ("model.graph=synthetic_x", "must be default or synthetic_<number of leaves>"),
])
def test_a_value_outside_its_rule_names_key_source_and_allowed(override, says):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert says in str(e.value) and f"--set {override}" in str(e.value)


def test_rules_relating_keys_are_checked_on_the_merged_config(tmp_path):
    f = write(tmp_path / "run.yaml", "data:\n  image_size: 224\n")
    with pytest.raises(ConfigError) as e:
        load_config(f, ["model.vit.patch_size=15", "seed=1"])
    assert str(f) in str(e.value) and "--set model.vit.patch_size=15" in str(e.value)
    assert "data.image_size=224 must be a multiple of model.vit.patch_size=15" in str(e.value)
    with pytest.raises(ConfigError, match="embed_dim=10 must be a multiple of 4"):
        load_config(overrides=["model.vit.embed_dim=10", "model.vit.num_heads=1"])
    with pytest.raises(ConfigError, match="min_new_tokens=20 must be <= eval.max_new_tokens=10"):
        load_config(overrides=["eval.min_new_tokens=20", "eval.max_new_tokens=10"])
    # a checkpoint's stored section is held to the same rules
    saved = load_config().model.to_dict()
    saved["vit"]["stem"] = "cnn"
    with pytest.raises(ConfigError, match=r"old\.pth: model.vit.stem='cnn' must be one of patch"):
        with_defaults("model", saved, "old.pth")
    saved["vit"].update(stem="patch", embed_dim=100, num_heads=3)
    with pytest.raises(ConfigError, match="old.pth: model.vit.embed_dim=100 must be a multiple of "
                                          "model.vit.num_heads=3"):
        with_defaults("model", saved, "old.pth")


def test_a_key_null_by_default_can_be_set_back_to_null(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text("train: {pretrained: output/demo/checkpoint-best.pth}\n")
    assert load_config(run).train.pretrained == "output/demo/checkpoint-best.pth"
    assert load_config(run, ["train.pretrained=null"]).train.pretrained is None
    with pytest.raises(ConfigError, match="optim.lr"):  # a key with a value by default is not nullable
        load_config(run, ["optim.lr=null"])

"""params.yaml validation: the committed file parses; bad values name their key."""

import copy

import pytest

from aelab.config import MODES, ConfigError, load_config, parse_config
from tests.conftest import ROOT


def test_committed_params_parse():
    cfg = load_config(ROOT / "params.yaml")
    assert set(cfg.variants) == {"fc_l1", "fc_l2", "conv_192", "conv_256", "mae", "mconv"}
    assert cfg.modes == MODES
    assert 0 < cfg.mask_ratio < 1
    mae = cfg.variant("mae")
    assert mae.reads == "mask_ratio" and mae.arch == "mae"
    # per-variant classify overrides sit on top of the global classify section
    assert mae.classify.optimizer == "adamw" and mae.classify.epochs == 40
    assert cfg.variant("conv_192").head_hidden == 150
    assert cfg.variant("fc_l1").classify.optimizer == "adam"


def _expect(raw, *fragments):
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, "high"])
def test_mask_ratio_out_of_range(params_raw, value):
    params_raw["mask_ratio"] = value
    _expect(params_raw, "mask_ratio")


def test_unknown_top_level_key(params_raw):
    params_raw["mask_ration"] = 0.5
    _expect(params_raw, "unknown key 'mask_ration'")


def test_unknown_nested_key(params_raw):
    params_raw["variants"]["mae"]["pretrain"]["lr_decay"] = 0.1
    _expect(params_raw, "variants.mae.pretrain.lr_decay")


def test_unknown_model_option(params_raw):
    params_raw["variants"]["conv_192"]["model"]["kernel"] = 3
    _expect(params_raw, "variants.conv_192.model.kernel")


def test_unknown_architecture(params_raw):
    params_raw["variants"]["fc_l1"]["arch"] = "resnet"
    _expect(params_raw, "variants.fc_l1.arch", "resnet", "mae")


def test_unknown_dataset(params_raw):
    params_raw["dataset"] = "imagenet"
    _expect(params_raw, "dataset", "cifar10")


def test_unknown_mode(params_raw):
    params_raw["classify"]["modes"] = ["scratch", "knn"]
    _expect(params_raw, "classify.modes[1]", "knn")


@pytest.mark.parametrize("key,value", [("epochs", 0), ("batch_size", -1), ("lr", 0),
                                       ("epochs", 2.5), ("optimizer", "lion"),
                                       ("accumulate", 0), ("accumulate", 1.5)])
def test_bad_train_values(params_raw, key, value):
    params_raw["variants"]["fc_l2"]["pretrain"][key] = value
    _expect(params_raw, f"variants.fc_l2.pretrain.{key}")


def test_mae_must_read_mask_ratio(params_raw):
    params_raw["variants"]["mae"]["reads"] = "seed"
    _expect(params_raw, "variants.mae.reads", "mask_ratio")


def test_mconv_reads_the_top_level_mask_ratio_unless_it_sets_its_own(params_raw):
    assert parse_config(params_raw).variant("mconv").reads == "mask_ratio"
    params_raw["variants"]["mconv"]["reads"] = "seeds"
    _expect(params_raw, "variants.mconv.reads", "must be 'mask_ratio'", "arch mconv")
    params_raw["variants"]["mconv"]["model"]["mask_ratio"] = 0.6  # its own: seeds is right
    cfg = parse_config(params_raw)
    assert cfg.variant("mconv").model["mask_ratio"] == 0.6
    from aelab.models import build_from_meta, model_meta

    meta = model_meta(cfg, "mconv", {"image_size": 32, "num_classes": 10})
    assert meta["mask_ratio"] == 0.6 != cfg.mask_ratio and build_from_meta(meta).mask_ratio == 0.6
    params_raw["variants"]["mconv"]["reads"] = "mask_ratio"
    _expect(params_raw, "variants.mconv.reads", "must be 'seeds'", "own model.mask_ratio")
    params_raw["variants"]["mconv"]["reads"] = "seeds"
    params_raw["variants"]["mconv"]["model"]["mask_ratio"] = 1.2
    _expect(params_raw, "variants.mconv.model", "mask_ratio must be in (0, 1)")


def test_missing_variant_section(params_raw):
    del params_raw["variants"]["fc_l1"]["classify"]
    _expect(params_raw, "variants.fc_l1.classify")


def test_val_fraction_range(params_raw):
    params_raw["data"]["val_fraction"] = 1.0
    _expect(params_raw, "data.val_fraction")


def test_warmup_longer_than_training(params_raw):
    raw = copy.deepcopy(params_raw)
    raw["variants"]["mae"]["pretrain"]["warmup_epochs"] = 500
    _expect(raw, "variants.mae.pretrain.warmup_epochs")


def test_unknown_variant_lookup():
    cfg = load_config(ROOT / "params.yaml")
    with pytest.raises(ConfigError, match="unknown variant 'vae'"):
        cfg.variant("vae")


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_inconsistent_model_options_fail_at_load(params_raw):
    params_raw["variants"]["mae"]["model"].update(decoder_dim=64, decoder_heads=3)
    _expect(params_raw, "variants.mae.model", "decoder_heads")


def test_check_models_false_skips_the_build_but_not_option_names(params_raw):
    """Stages that build their own variant skip the meta build; option names are always checked."""
    params_raw["variants"]["mae"]["model"].update(decoder_dim=64, decoder_heads=3)
    cfg = parse_config(params_raw, check_models=False)
    assert "mae" in cfg.variants
    params_raw["variants"]["mae"]["model"]["depht"] = 2
    with pytest.raises(ConfigError, match="depht"):
        parse_config(params_raw, check_models=False)


def test_no_stage_imports_timm_not_even_to_build_an_mae():
    """timm imports torchvision, whose ops import torch._dynamo (~1.5 s of start-up on 2 cores):
    the stages build every architecture, the MAE included, without it (aelab.models.vit)."""
    import subprocess
    import sys

    code = ("import sys; from aelab.config import load_config; import aelab.pretrain, "
            "aelab.classify, aelab.evaluate; cfg = load_config('params.yaml', check_models=False); "
            "from aelab.models import build_from_meta; "
            "archs = {v.arch for v in cfg.variants.values()}; assert 'mae' in archs, archs; "
            "[build_from_meta({'arch': v.arch, 'model': v.model, 'mask_ratio': 0.5}) "
            "for v in cfg.variants.values()]; "
            "print(sorted(m for m in ('timm', 'torchvision', 'torch._dynamo') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_config_check_of_an_mae_does_not_import_timm():
    """Every stage validates every variant; an MAE's options are checked without timm."""
    import subprocess
    import sys

    code = ("import sys; from aelab.config import load_config; load_config('params.yaml'); "
            "print('timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_config_check_builds_no_model():
    """Every stage checks every variant's options; building a model for that, even on the meta
    device, imports torch._dynamo (a conv's random init there goes through it): ~2 s of every
    stage's start-up. Each architecture's check_options checks without building."""
    import subprocess
    import sys

    code = ("import sys; from aelab.config import load_config; load_config('params.yaml'); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("value", [0, 1.5, -0.1, "all"])
def test_label_fraction_range(params_raw, value):
    params_raw["label_fraction"] = value
    _expect(params_raw, "label_fraction")


@pytest.mark.parametrize("augment,key", [({"crop": "cutout"}, "crop"), ({"pad": -1}, "pad"),
                                         ({"scale": [0.5, 0.2]}, "scale"),
                                         ({"scale": [0.2, 1.5]}, "scale"),
                                         ({"flip": "yes"}, "flip"), ({"rotate": 10}, "rotate")])
def test_bad_augment(params_raw, augment, key):
    params_raw["variants"]["mae"]["pretrain"]["augment"] = augment
    _expect(params_raw, f"variants.mae.pretrain.augment.{key}")


def test_augment_and_probe_inheritance(params_raw):
    params_raw["classify"]["probe"] = {"epochs": 80, "lr": 3e-3}
    params_raw["variants"]["mae"]["classify"]["probe"] = {"lr": 1e-2}
    params_raw["variants"]["conv_256"]["classify"]["augment"] = {"pad": 2}
    cfg = parse_config(params_raw)
    conv = cfg.variant("conv_256")
    assert conv.classify.augment.crop == "pad" and conv.classify.augment.pad == 2
    assert conv.classify.augment.flip  # the rest of classify.augment is inherited
    assert (conv.probe.epochs, conv.probe.lr) == (80, 3e-3)
    assert not conv.probe.augment.active  # probes train on cached features
    mae = cfg.variant("mae")
    assert (mae.probe.epochs, mae.probe.lr, mae.probe.optimizer) == (80, 1e-2, "adamw")
    assert mae.pretrain.augment.crop == "resized"
    params_raw["classify"]["probe"] = {"augment": {"flip": True}}
    _expect(params_raw, "classify.probe.augment", "computed once per image")


def test_bad_model_option_value(params_raw):
    params_raw["variants"]["fc_l1"]["model"]["loss"] = "huber"
    _expect(params_raw, "variants.fc_l1.model", "huber")


@pytest.mark.parametrize("value", [[], [0, 0], [1, -1], "0", [0.5]])
def test_bad_seeds(params_raw, value):
    params_raw["seeds"] = value
    _expect(params_raw, "seeds")


@pytest.mark.parametrize("variant, option, value, message", [
    ("conv_192", "channels", 8, "must be a list like [8, 16, 32, 64], got 8"),
    ("conv_192", "channels", [8, "16"], "must be a list like [8, 16, 32, 64], got [8, '16']"),
    ("mae", "patch_size", "2", "must be an integer, got '2'"),
    ("mae", "patch_size", 2.0, "must be an integer, got 2.0"),
    ("mae", "depth", True, "must be an integer, got True"),
    ("mae", "norm_pix_loss", 1, "must be true or false, got 1"),
    ("mae", "pool", ["cls"], "must be a string, got ['cls']"),
    ("fc_l1", "loss", None, "must be a string, got None"),
])
def test_model_option_types_are_checked_without_building(params_raw, variant, option, value,
                                                          message):
    """Each option has its constructor default's type; checked even where the stage builds the
    model itself (check_models=False), so a wrong type is never a TypeError deep in a stage."""
    params_raw["variants"][variant]["model"][option] = value
    with pytest.raises(ConfigError) as err:
        parse_config(params_raw, check_models=False)
    assert str(err.value) == f"params.yaml: 'variants.{variant}.model.{option}' {message}"


def test_model_option_numbers(params_raw):
    params_raw["variants"]["mae"]["model"]["mlp_ratio"] = 4  # an integer is a number
    assert parse_config(params_raw).variant("mae").model["mlp_ratio"] == 4


@pytest.mark.parametrize("edit, message", [
    (lambda raw: raw["classify"].update(probe=[]), "'classify.probe' must be a mapping, got list"),
    (lambda raw: raw["variants"]["fc_l1"].update(classify=[]),
     "'variants.fc_l1.classify' must be a mapping, got list"),
    (lambda raw: raw["data"].update(imagefolder=["a"]),
     "'data.imagefolder' must be a folder path, got ['a']"),
    (lambda raw: raw.update(data="shapes"), "'data' must be a mapping, got str"),
    (lambda raw: raw["variants"]["fc_l1"]["pretrain"].update(epochs="ten"),
     "'variants.fc_l1.pretrain.epochs' must be an integer, got 'ten'"),
    (lambda raw: raw.update(seeds=3), "'seeds' must be a non-empty list of integers"),
    (lambda raw: raw.pop("mask_ratio"), "top-level key 'mask_ratio' is required"),
])
def test_wrong_types_and_missing_keys_name_the_key(params_raw, edit, message):
    edit(params_raw)
    _expect(params_raw, message)


def test_empty_sections_may_be_left_blank(params_raw):
    params_raw["classify"]["probe"] = None
    params_raw["variants"]["fc_l1"]["classify"] = None
    cfg = parse_config(params_raw)
    assert cfg.variant("fc_l1").probe.epochs == cfg.variant("fc_l1").classify.epochs


def test_an_empty_params_file(tmp_path):
    (tmp_path / "params.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="params.yaml is empty"):
        load_config(tmp_path / "params.yaml")


def test_runtime_compile_is_a_switch(params_raw):
    assert load_config(ROOT / "params.yaml").runtime.compile is False  # opt-in
    params_raw["runtime"]["compile"] = True
    assert parse_config(params_raw).runtime.compile is True
    params_raw["runtime"]["compile"] = "yes"
    _expect(params_raw, "runtime.compile", "true or false")


def test_accumulate_is_inherited_by_probes_like_any_training_setting(params_raw):
    params_raw["variants"]["mae"]["pretrain"]["accumulate"] = 8
    params_raw["classify"]["accumulate"] = 2
    cfg = parse_config(params_raw)
    assert cfg.variant("mae").pretrain.accumulate == 8
    assert cfg.variant("conv_192").classify.accumulate == 2 == cfg.variant("conv_192").probe.accumulate
    assert cfg.variant("fc_l1").pretrain.accumulate == 1

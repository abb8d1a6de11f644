"""The pretrain and classify steps in-process, on a tiny shapes dataset."""

import pytest
import torch

import aelab.classify
import aelab.pretrain
from aelab.checkpoint import CheckpointError, load_checkpoint, read_json
from aelab.classify import run_classify
from aelab.config import ConfigError, parse_config
from aelab.data import prepare
from aelab.pretrain import run_pretrain


@pytest.fixture
def tiny(tmp_path, params_raw):
    """A validated tiny config and a prepared 200-image shapes dataset."""
    params_raw["dataset"] = "shapes"
    params_raw["seeds"] = [0, 1]
    params_raw["data"].update(shapes_train=200, shapes_test=50, val_fraction=0.2)
    for v in params_raw["variants"].values():
        v["pretrain"].update(epochs=1, batch_size=50, warmup_epochs=0)
        v["classify"]["warmup_epochs"] = 0
    params_raw["variants"]["mae"]["model"].update(patch_size=8, dim=32, depth=1, heads=2,
                                                  decoder_dim=32, decoder_depth=1,
                                                  decoder_heads=2)
    params_raw["classify"].update(epochs=2, batch_size=50)
    data = tmp_path / "prepared"
    prepare("shapes", data, seed=0, val_fraction=0.2, shapes_train=200, shapes_test=50)
    return params_raw, data, tmp_path


def _spy_splits(monkeypatch):
    """Record every split the steps load."""
    seen = []
    for module in (aelab.pretrain, aelab.classify):
        original = module.load_split

        def spy(directory, split, _original=original):
            seen.append(split)
            return _original(directory, split)

        monkeypatch.setattr(module, "load_split", spy)
    return seen


def test_training_never_reads_the_test_split(tiny, monkeypatch):
    raw, data, tmp = tiny
    cfg = parse_config(raw)
    seen = _spy_splits(monkeypatch)
    run_pretrain(cfg, "conv_192", data, tmp / "m", tmp / "r")
    run_classify(cfg, "conv_192", "linear_finetune", data, tmp / "m/init/linear_finetune.json",
                 tmp / "c.pt", tmp / "rc")
    assert seen and "test" not in seen


def test_probe_keeps_pretrained_encoder_and_selects_on_validation(tiny):
    raw, data, tmp = tiny
    cfg = parse_config(raw)
    run_pretrain(cfg, "fc_l1", data, tmp / "m", tmp / "r")
    metrics = run_classify(cfg, "fc_l1", "linear_probe", data, tmp / "m/init/linear_probe.json",
                           tmp / "c.pt", tmp / "rc")
    for seed in (0, 1):
        pretrained, _ = load_checkpoint(tmp / f"m/seed{seed}.pt")
        state, meta = load_checkpoint(tmp / f"c.pt/seed{seed}.pt")
        for name, tensor in pretrained.items():
            assert torch.equal(state[f"backbone.{name}"], tensor), name
        assert meta["selected_by"] == "val_acc" and meta["seed"] == seed
        assert meta["best_epoch"] == metrics["per_seed"][str(seed)]["best_epoch"]
    assert metrics["trainable_params"] < metrics["params"] / 100  # head only
    # the seeds really differ: two pretrainings from two inits
    a, _ = load_checkpoint(tmp / "m/seed0.pt")
    b, _ = load_checkpoint(tmp / "m/seed1.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_scratch_manifest_ignores_pretraining_but_pretrained_ones_follow_it(tiny):
    raw, data, tmp = tiny
    run_pretrain(parse_config(raw), "mae", data, tmp / "a", tmp / "ra")
    raw["mask_ratio"] = 0.5
    run_pretrain(parse_config(raw), "mae", data, tmp / "b", tmp / "rb")
    for name in ("scratch.json", "linear_probe.json"):
        same = (tmp / "a/init" / name).read_bytes() == (tmp / "b/init" / name).read_bytes()
        assert same == (name == "scratch.json"), name
    assert read_json(tmp / "a/init/scratch.json")["init"] == "random"


def test_stale_checkpoint_is_refused(tiny):
    raw, data, tmp = tiny
    cfg = parse_config(raw)
    run_pretrain(cfg, "conv_192", data, tmp / "m", tmp / "r")
    with open(tmp / "m/seed1.pt", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(CheckpointError, match="stale"):
        run_classify(cfg, "conv_192", "mlp_probe", data, tmp / "m/init/mlp_probe.json",
                     tmp / "c.pt", tmp / "rc")


def test_missing_checkpoint_is_one_clear_error(tiny):
    raw, data, tmp = tiny
    with pytest.raises(CheckpointError, match="missing file"):
        run_classify(parse_config(raw), "fc_l2", "mlp_probe", data,
                     tmp / "nowhere/init/mlp_probe.json", tmp / "c.pt", tmp / "rc")


def test_inconsistent_model_options_stop_pretrain_before_training(tiny):
    """The stages skip the meta-device check of all variants; their own build names the key."""
    raw, data, tmp = tiny
    raw["variants"]["mae"]["model"]["heads"] = 5  # dim 32 is not divisible by 5
    cfg = parse_config(raw, check_models=False)
    with pytest.raises(ConfigError) as err:
        run_pretrain(cfg, "mae", data, tmp / "m", tmp / "r")
    assert str(err.value).startswith("params.yaml: 'variants.mae.model': dim (32)")
    assert not (tmp / "m").exists() and not (tmp / "r").exists()

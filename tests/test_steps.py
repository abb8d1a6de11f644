"""The pretrain and classify steps in-process, on a tiny shapes dataset."""

import csv

import pytest
import torch

import aelab.classify
import aelab.pretrain
from aelab.checkpoint import CheckpointError, load_checkpoint, read_json
from aelab.classify import run_classify
from aelab.config import ConfigError, modes_of, parse_config
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
        if v["arch"] == "fc":  # small checkpoints: the seed's FC is 12 M parameters
            v["model"]["hidden"] = [192, 96, 48]
    params_raw["variants"]["mae"]["model"].update(patch_size=8, dim=32, depth=1, heads=2,
                                                  decoder_dim=32, decoder_depth=1,
                                                  decoder_heads=2)
    params_raw["variants"]["mconv"]["model"].update(channels=[4, 8, 8], blocks=1)
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
    run_classify(cfg, "conv_192", "pretrained", data, tmp / "m/init/pretrained.json",
                 tmp / "c", tmp / "rc")
    assert seen and "test" not in seen


def test_pretrained_stage_trains_every_pretrained_mode_and_probes_keep_the_encoder(tiny):
    raw, data, tmp = tiny
    cfg = parse_config(raw)
    run_pretrain(cfg, "fc_l1", data, tmp / "m", tmp / "r")
    metrics = run_classify(cfg, "fc_l1", "pretrained", data, tmp / "m/init/pretrained.json",
                           tmp / "c", tmp / "rc")
    assert list(metrics) == ["mlp_finetune", "mlp_probe", "linear_finetune", "linear_probe"]
    assert read_json(tmp / "rc/metrics.json") == metrics
    for mode in metrics:
        assert (tmp / f"rc/history/{mode}.csv").is_file()
    for seed in (0, 1):
        pretrained, _ = load_checkpoint(tmp / f"m/seed{seed}.pt")
        for mode in ("mlp_probe", "linear_probe"):
            state, meta = load_checkpoint(tmp / f"c/{mode}/seed{seed}.pt")
            for name, tensor in pretrained.items():
                assert torch.equal(state[f"backbone.{name}"], tensor), (mode, name)
            assert meta["selected_by"] == "val_acc" and meta["seed"] == seed
            assert meta["best_epoch"] == metrics[mode]["per_seed"][str(seed)]["best_epoch"]
        tuned, _ = load_checkpoint(tmp / f"c/mlp_finetune/seed{seed}.pt")
        assert any(not torch.equal(tuned[f"backbone.{k}"], v) for k, v in pretrained.items())
    probe = metrics["linear_probe"]
    assert probe["trainable_params"] < probe["params"] / 100  # head only


def test_label_fraction_trains_classifiers_on_a_stratified_share(tiny):
    raw, data, tmp = tiny
    raw["label_fraction"] = 0.25
    cfg = parse_config(raw)
    metrics = run_classify(cfg, "conv_256", "scratch", data, _scratch_manifest(tmp, cfg),
                           tmp / "c", tmp / "rc")
    assert list(metrics) == ["scratch"]
    # 160 training images (16 per class) -> 4 labelled per class
    assert metrics["scratch"]["n_train_labelled"] == 40
    assert metrics["scratch"]["label_fraction"] == 0.25
    _, meta = load_checkpoint(tmp / "c/scratch/seed0.pt")
    assert meta["label_fraction"] == 0.25


def _scratch_manifest(tmp, cfg):
    """Pretraining writes the scratch manifest; write it directly (no pretraining needed)."""
    from aelab.models import model_meta
    from aelab.pretrain import write_manifests

    write_manifests(tmp / "m", model_meta(cfg, "conv_256", {"image_size": 32, "num_classes": 10}),
                    {})
    return tmp / "m/init/scratch.json"
    # the seeds really differ: two pretrainings from two inits
    a, _ = load_checkpoint(tmp / "m/seed0.pt")
    b, _ = load_checkpoint(tmp / "m/seed1.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_scratch_manifest_ignores_pretraining_but_pretrained_ones_follow_it(tiny):
    raw, data, tmp = tiny
    run_pretrain(parse_config(raw), "mae", data, tmp / "a", tmp / "ra")
    raw["mask_ratio"] = 0.5
    run_pretrain(parse_config(raw), "mae", data, tmp / "b", tmp / "rb")
    for name in ("scratch.json", "pretrained.json"):
        same = (tmp / "a/init" / name).read_bytes() == (tmp / "b/init" / name).read_bytes()
        assert same == (name == "scratch.json"), name
    assert read_json(tmp / "a/init/scratch.json")["init"] == "scratch"


def test_stale_checkpoint_is_refused(tiny):
    raw, data, tmp = tiny
    cfg = parse_config(raw)
    run_pretrain(cfg, "conv_192", data, tmp / "m", tmp / "r")
    with open(tmp / "m/seed1.pt", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(CheckpointError, match="stale"):
        run_classify(cfg, "conv_192", "pretrained", data, tmp / "m/init/pretrained.json",
                     tmp / "c", tmp / "rc")
    assert not (tmp / "c").exists() and not (tmp / "rc").exists()


def test_every_run_counts_its_own_peak_memory(tiny, monkeypatch):
    """On a GPU one process trains every seed and mode of a stage and CUDA's peak is per
    process: each run resets it before training and reads it after, so a run's `peak_mem_mb`
    is its own, not the largest of the runs before it."""
    raw, data, tmp = tiny
    cfg = parse_config(raw)
    events = []
    for module in (aelab.pretrain, aelab.classify):
        monkeypatch.setattr(module, "reset_peak_memory", lambda device: events.append("reset"))
        monkeypatch.setattr(module, "peak_memory_mb",
                            lambda device: events.append("peak") or 1.0)
    run_pretrain(cfg, "conv_192", data, tmp / "m", tmp / "r")
    run_classify(cfg, "conv_192", "pretrained", data, tmp / "m/init/pretrained.json",
                 tmp / "c", tmp / "rc")
    runs = len(cfg.seeds) * (1 + len(modes_of("pretrained", cfg.modes)))
    assert events == ["reset", "peak"] * runs


def test_a_deleted_pretrained_checkpoint_is_named_before_training(tiny):
    raw, data, tmp = tiny
    cfg = parse_config(raw)
    run_pretrain(cfg, "conv_192", data, tmp / "m", tmp / "r")
    (tmp / "m/seed1.pt").unlink()
    with pytest.raises(CheckpointError) as err:
        run_classify(cfg, "conv_192", "pretrained", data, tmp / "m/init/pretrained.json",
                     tmp / "c", tmp / "rc")
    assert str(err.value) == (f"pretrained checkpoint not found: {tmp / 'm/seed1.pt'} "
                              "(run its pretrain stage first)")
    assert not (tmp / "c").exists() and not (tmp / "rc").exists()


def test_missing_checkpoint_is_one_clear_error(tiny):
    raw, data, tmp = tiny
    with pytest.raises(CheckpointError, match="missing file"):
        run_classify(parse_config(raw), "fc_l2", "pretrained", data,
                     tmp / "nowhere/init/pretrained.json", tmp / "c", tmp / "rc")


def test_inconsistent_model_options_stop_pretrain_before_training(tiny):
    """The stages skip the config check of all variants; their own build names the key."""
    raw, data, tmp = tiny
    raw["variants"]["mae"]["model"]["heads"] = 5  # dim 32 is not divisible by 5
    cfg = parse_config(raw, check_models=False)
    with pytest.raises(ConfigError) as err:
        run_pretrain(cfg, "mae", data, tmp / "m", tmp / "r")
    assert str(err.value).startswith("params.yaml: 'variants.mae.model': dim (32)")
    assert not (tmp / "m").exists() and not (tmp / "r").exists()


def _without_cost(metrics: dict) -> dict:
    """Metrics minus what differs between two identical runs: time, memory and run ids."""
    if isinstance(metrics, dict):
        return {k: _without_cost(v) for k, v in metrics.items()
                if k not in ("train_seconds", "peak_mem_mb", "mlflow_run_id", "device")}
    return metrics


def test_seed_workers_train_exactly_what_the_serial_loop_trains(tiny, monkeypatch):
    """Seeds in forked workers (one thread each) give the same weights and numbers as one
    process with one thread training them in turn, and every run is in MLflow."""
    from mlflow.tracking import MlflowClient

    from aelab import tracking

    raw, data, tmp = tiny
    raw["classify"]["modes"] = ["scratch", "mlp_finetune", "linear_probe"]
    outputs = {}
    for workers in (1, 2):
        raw["runtime"] = {"seed_workers": workers}
        cfg = parse_config(raw)
        out = tmp / f"w{workers}"
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if workers == 1 else 2)  # workers get 2 // 2 threads each
        try:
            pre = run_pretrain(cfg, "conv_192", data, out / "m", out / "r")
            cls = {init: run_classify(cfg, "conv_192", init, data, out / f"m/init/{init}.json",
                                      out / f"c-{init}", out / f"rc-{init}")
                   for init in ("scratch", "pretrained")}
        finally:
            torch.set_num_threads(threads)
        outputs[workers] = (pre, cls, out)
    (pre1, cls1, out1), (pre2, cls2, out2) = outputs[1], outputs[2]
    assert _without_cost(pre1) == _without_cost(pre2)
    assert pre2["device"].endswith("2 seed workers of 1 thread")
    assert _without_cost(cls1) == _without_cost(cls2)
    checkpoints = sorted(p.relative_to(out1) for p in out1.rglob("seed*.pt"))
    assert len(checkpoints) == 2 + 2 * 3  # pretrain and every mode, two seeds each
    for rel in checkpoints:
        (a, meta_a), (b, meta_b) = load_checkpoint(out1 / rel), load_checkpoint(out2 / rel)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel
        assert _without_cost(meta_a) == _without_cost(meta_b), rel  # best epoch, seed, ...
    for history in ("r/history.csv", "rc-pretrained/history/mlp_finetune.csv"):
        rows = [[{k: v for k, v in row.items() if k not in ("epoch_seconds", "img_s")}
                 for row in csv.DictReader((out / history).open())] for out in (out1, out2)]
        assert rows[0] == rows[1] and len(rows[0]) >= 2, history

    # What the workers logged went through this process's agent into the store.
    tracking.flush()
    client = MlflowClient(tracking.tracking_uri())
    for mode, per_mode in cls2["pretrained"].items():
        for seed, row in per_mode["per_seed"].items():
            run = client.get_run(row["mlflow_run_id"])
            assert run.info.status == "FINISHED"
            assert (run.data.tags["seed"], run.data.tags["mode"]) == (seed, mode)
            epochs = client.get_metric_history(run.info.run_id, "val/acc")
            assert [m.step for m in epochs] == [1, 2]
            assert run.data.metrics["best_val_acc"] == row["best_val_acc"]

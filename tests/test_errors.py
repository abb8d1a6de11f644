"""Bad input: every row of the README's error table, run through the real stage script.

Each row exits 1 with exactly one stderr line, `Error: <cause>`, and no traceback (`--debug` or
AELAB_DEBUG=1 shows it). Then the security checks: checkpoints load weights only, the UI binds
to 127.0.0.1 (the archive checks are in test_data.py).
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from aelab import layout
from aelab.checkpoint import (CheckpointError, load_checkpoint, load_weights, save_checkpoint,
                              write_json)
from aelab.config import parse_config
from aelab.data import load_meta, prepare, write_cifar_archive
from aelab.models import build_classifier, build_from_meta, classifier_meta, model_meta
from tests.conftest import ROOT

FAKE_PID = 4242  # the full-disk row: the stage's temp file is then a name known beforehand
# Runs a stage script as __main__ with os.getpid() fixed, so the test can put a link to
# /dev/full (every write: ENOSPC) where the stage writes its temp file.
FIXED_PID_DRIVER = (f"import os, runpy, sys; os.getpid = lambda: {FAKE_PID}; "
                    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def _tiny(raw: dict) -> dict:
    """The committed params cut down to one small fc variant, its scratch classifier, one seed,
    on 40 + 20 generated shapes."""
    raw = copy.deepcopy(raw)
    raw.update(dataset="shapes", seeds=[0], label_fraction=1)
    raw["data"].update(shapes_train=40, shapes_test=20)
    raw["variants"] = {"fc_l1": {"arch": "fc", "reads": "seeds",
                                 "model": {"hidden": [16, 8], "loss": "l1"},
                                 "pretrain": {"epochs": 1, "batch_size": 16, "lr": 1e-3},
                                 "classify": {}}}
    raw["classify"].update(modes=["scratch"], epochs=1, batch_size=16)
    raw["evaluate"] = {"knn_k": 5, "batch_size": 64}
    return raw


@pytest.fixture(scope="module")
def tiny_raw() -> dict:
    return _tiny(yaml.safe_load((ROOT / "params.yaml").read_text()))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_raw) -> Path:
    """The tiny shapes dataset, prepared once for the rows that need one (read only)."""
    out = tmp_path_factory.mktemp("data") / "prepared"
    d = parse_config(tiny_raw).data
    prepare("shapes", out, seed=0, val_fraction=d.val_fraction, shapes_train=d.shapes_train,
            shapes_test=d.shapes_test)
    return out


def _write_checkpoints(root: Path, raw: dict, prepared: Path, *,
                       classifier_raw: dict | None = None) -> Path:
    """What the evaluate stage reads for `raw`: the fc_l1 encoder and its scratch classifier
    (seed 0); the classifier built from `classifier_raw` instead when given. Returns the
    classifier checkpoint's path."""
    dataset_meta = load_meta(prepared)
    cfg = parse_config(raw)
    meta = model_meta(cfg, "fc_l1", dataset_meta)
    save_checkpoint(layout.pretrain_checkpoint(root / "encoders" / "fc_l1", 0),
                    build_from_meta(meta).state_dict(), {**meta, "seed": 0})
    meta = classifier_meta(parse_config(classifier_raw or raw), "fc_l1", "scratch", dataset_meta)
    path = layout.classifier_checkpoint_in(root / "models", "fc_l1", "scratch", 0)
    save_checkpoint(path, build_classifier(meta).state_dict(), {**meta, "seed": 0})
    return path


class _Exploit:
    """A pickle that runs a shell command when loaded without weights_only."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --- the rows: each edits the params and the files, and names its stage ------------------------

PREPARE = ("prepare.py", "--out", "prepared", "--external", "ext", "--downloads", "dl")
EVALUATE = ("evaluate.py", "--data", "{prepared}", "--models", "models", "--encoders", "encoders",
            "--out", "out/test.json")


def _set(*path_and_value):
    """A row edit: set raw[k1][k2]... = value."""
    *keys, last, value = path_and_value

    def edit(raw, tmp, prepared):
        section = raw
        for key in keys:
            section = section[key]
        section[last] = value
    return edit


def _drop_lr(raw, tmp, prepared):
    del raw["variants"]["fc_l1"]["pretrain"]["lr"]


def _mae_patch_5(raw, tmp, prepared):
    raw["variants"]["mae"] = {"arch": "mae", "reads": "mask_ratio",
                              "model": {"patch_size": 5, "dim": 16, "depth": 1, "heads": 2,
                                        "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
                              "pretrain": {"epochs": 1, "batch_size": 16, "lr": 1e-3},
                              "classify": {}}


def _conv_six_layers(raw, tmp, prepared):
    raw["variants"]["conv"] = {"arch": "conv", "reads": "seeds",
                               "model": {"channels": [4, 4, 4, 4, 4, 4]},
                               "pretrain": {"epochs": 1, "batch_size": 16, "lr": 1e-3},
                               "classify": {}}


def _image_folder(classes: tuple[str, ...], bad: bool = False):
    """A row edit: an image folder with one PNG per class and split (and no image at all
    without classes); with `bad`, one of them is text named .png."""

    def edit(raw, tmp, prepared):
        from PIL import Image

        root = tmp / "images"
        root.mkdir()
        for split in ("train", "test"):
            for name in classes:
                (root / split / name).mkdir(parents=True)
                Image.new("RGB", (32, 32), (200, 30, 30)).save(root / split / name / "0.png")
        if bad:
            (root / "train" / classes[0] / "0.png").write_text("not an image")
        raw.update(dataset="imagefolder")
        raw["data"]["imagefolder"] = str(root)
    return edit


def _cifar_archive(truncate: bool):
    """A row edit: a small CIFAR-10 archive, cut in half with `truncate` (checked on decoding,
    checksum off); whole otherwise (its md5 is not the real one's: checksum on)."""

    def edit(raw, tmp, prepared):
        from torchvision.datasets import CIFAR10

        archive = tmp / "ext" / CIFAR10.filename
        write_cifar_archive(archive, "cifar10", 50, 10)
        if truncate:
            archive.write_bytes(archive.read_bytes()[:archive.stat().st_size // 2])
        raw.update(dataset="cifar10")
        raw["data"]["verify_checksum"] = not truncate
    return edit


def _foreign_classifier(raw, tmp, prepared):
    """The fc_l1 classifier checkpoint holds a conv classifier (fc_l1 was a conv variant when it
    was trained)."""
    conv = copy.deepcopy(raw)
    conv["variants"]["fc_l1"].update(arch="conv", model={"channels": [4, 4, 4, 4]})
    _write_checkpoints(tmp, raw, prepared, classifier_raw=conv)


def _missing_encoder(raw, tmp, prepared):
    """The classifiers are there, the pretrained encoder of seed 0 is not (the kNN check needs
    it): the stage fails before scoring or registering anything."""
    _write_checkpoints(tmp, raw, prepared)
    layout.pretrain_checkpoint(tmp / "encoders" / "fc_l1", 0).unlink()


def _malicious_classifier(raw, tmp, prepared):
    path = _write_checkpoints(tmp, raw, prepared)
    torch.save({"state_dict": _Exploit(tmp / "pwned"), "meta": {}}, path)


def _full_disk(raw, tmp, prepared):
    _write_checkpoints(tmp, raw, prepared)
    (tmp / "out").mkdir()
    (tmp / "out" / f".test.json.tmp-{FAKE_PID}").symlink_to("/dev/full")


# (id, edit, stage args, expected fragment of the one line); one per row of the README table.
ROWS = [
    ("unknown-key", _set("mask_ration", 0.5), PREPARE,
     "params.yaml: unknown key 'mask_ration' (allowed here: "),
    ("missing-key", _drop_lr, PREPARE, "params.yaml: 'variants.fc_l1.pretrain.lr' is required"),
    ("wrong-type-number", _set("variants", "fc_l1", "pretrain", "epochs", "ten"), PREPARE,
     "params.yaml: 'variants.fc_l1.pretrain.epochs' must be an integer, got 'ten'"),
    ("wrong-type-list", _set("seeds", 3), PREPARE,
     "params.yaml: 'seeds' must be a non-empty list of integers, e.g. [0, 1, 2]"),
    ("wrong-type-mapping", _set("data", ["shapes"]), PREPARE,
     "params.yaml: 'data' must be a mapping, got list"),
    ("wrong-type-model-option", _set("variants", "fc_l1", "model", "hidden", 16), PREPARE,
     "params.yaml: 'variants.fc_l1.model.hidden' must be a list like [1536, 768, 384], got 16"),
    ("mask-ratio", _set("mask_ratio", 1.0), PREPARE,
     "params.yaml: 'mask_ratio' = 1.0 is outside (0, 1)"),
    ("patch-size", _mae_patch_5, PREPARE,
     "params.yaml: 'variants.mae.model': image_size (32) must be a multiple of patch_size (5)"),
    ("latent-size", _conv_six_layers, PREPARE,
     "params.yaml: 'variants.conv.model': image_size must be a positive multiple of 64 for 6 "
     "stride-2 layers, got 32"),
    ("empty-image-folder", _image_folder(()), PREPARE, "/images is empty; expected <root>/train/"),
    ("unreadable-image", _image_folder(("cat", "dog"), bad=True), PREPARE,
     "/images/train/cat/0.png: cannot read image (cannot identify image file"),
    ("one-class", _image_folder(("cat",)), PREPARE,
     "/images/train: only one class folder ('cat'); a classifier needs at least two classes"),
    ("archive-checksum", _cifar_archive(truncate=False), PREPARE,
     "ext/cifar-10-python.tar.gz: CIFAR-10 checksum mismatch: expected "
     "c58f30108f718f92721af3b95e74349a"),
    ("archive-truncated", _cifar_archive(truncate=True), PREPARE,
     "ext/cifar-10-python.tar.gz: corrupt or truncated archive ("),
    ("foreign-checkpoint", _foreign_classifier, EVALUATE,
     "Error: models/fc_l1-scratch/scratch/seed0.pt holds weights of another architecture "
     "(missing: backbone.decoder.0.weight, "),
    ("missing-encoder", _missing_encoder, EVALUATE,
     "Error: checkpoint not found: encoders/fc_l1/seed0.pt (run its DVC stage first)"),
    ("malicious-checkpoint", _malicious_classifier, EVALUATE,
     "refusing to load models/fc_l1-scratch/scratch/seed0.pt: its pickle calls posix.system "
     "(checkpoints load with weights_only=True); delete it and rerun its stage"),
    ("full-disk", _full_disk, EVALUATE,
     "no space left on device while writing out/test.json; free some space and rerun the stage"),
]


def _run(args, cwd: Path, *, driver: str | None = None, env: dict | None = None):
    script = str(ROOT / "stages" / args[0])
    prefix = [sys.executable, "-c", driver] if driver else [sys.executable]
    return subprocess.run([*prefix, script, *args[1:]], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**{k: v for k, v in os.environ.items()
                                               if k != "AELAB_DEBUG"},
                                            "TQDM_DISABLE": "1", **(env or {})})


@pytest.mark.parametrize("edit, args, expected", [row[1:] for row in ROWS],
                         ids=[row[0] for row in ROWS])
def test_bad_input_is_one_line(tmp_path, tiny_raw, prepared, edit, args, expected):
    raw = copy.deepcopy(tiny_raw)
    edit(raw, tmp_path, prepared)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = [a.format(prepared=prepared) for a in args]
    full_disk = edit is _full_disk
    proc = _run(args, tmp_path, driver=FIXED_PID_DRIVER if full_disk else None)

    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    if full_disk:  # the link to /dev/full removed with the temp file, no partial test.json
        assert after == [p for p in before if p.name != f".test.json.tmp-{FAKE_PID}"]
        assert Path("/dev/full").is_char_device()
    else:  # nothing written: no output, no temp file
        assert after == before
    assert not (tmp_path / "pwned").exists()  # the malicious checkpoint's command never ran


def test_debug_shows_the_traceback(tmp_path, tiny_raw):
    raw = copy.deepcopy(tiny_raw)
    raw["mask_ratio"] = 1.0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    for extra, env in ((("--debug",), None), ((), {"AELAB_DEBUG": "1"})):
        proc = _run([*PREPARE, *extra], tmp_path, env=env)
        assert proc.returncode == 1
        assert "Traceback (most recent call last)" in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
            "aelab.config.ConfigError: params.yaml: 'mask_ratio' = 1.0 is outside (0, 1)")


# --- checkpoints and saving, in process ------------------------------------------------------

def test_evaluate_checks_every_encoder_before_registering(tmp_path, tiny_raw, prepared,
                                                          monkeypatch):
    """The best classifiers go to the MLflow registry while the kNN check runs; an encoder
    checkpoint that cannot be read must stop the stage before that, not leave registered
    models behind a failed stage."""
    import aelab.evaluate as evaluate

    registered = []
    monkeypatch.setattr(evaluate.tracking, "prepare_registration", lambda archs: None)
    monkeypatch.setattr(evaluate, "register_best", lambda *a, **k: registered.append(a) or {})
    _write_checkpoints(tmp_path, tiny_raw, prepared)
    encoder = layout.pretrain_checkpoint(tmp_path / "encoders" / "fc_l1", 0)
    encoder.write_bytes(encoder.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {encoder}: "):
        evaluate.run_evaluate(parse_config(tiny_raw), prepared, tmp_path / "models",
                              tmp_path / "encoders", tmp_path / "test.json")
    assert registered == [] and not (tmp_path / "test.json").exists()


def test_a_malicious_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _Exploit(marker), "meta": {}}, path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"refusing to load {path}: its pickle calls posix.system "
                              "(checkpoints load with weights_only=True); delete it and rerun "
                              "its stage")
    assert not marker.exists()


@pytest.mark.parametrize("damage, reason", [
    (lambda blob: blob[:len(blob) // 2], "PytorchStreamReader failed reading zip archive"),
    (lambda blob: b"<html>not found</html>", "not a torch.save file of tensors"),
    (lambda blob: b"", "EOFError"),
], ids=["truncated", "foreign", "empty"])
def test_a_corrupt_checkpoint_is_one_line(tmp_path, damage, reason):
    path = tmp_path / "seed0.pt"
    save_checkpoint(path, {"w": torch.zeros(100)}, {"seed": 0})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"cannot read checkpoint {path}: ") and reason in message
    assert message.endswith("; rerun its stage") and "\n" not in message


def test_weights_of_another_architecture_are_named(tmp_path):
    small, large = torch.nn.Linear(4, 2), torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(CheckpointError) as err:
        load_weights(small, large.state_dict(), tmp_path / "x.pt")
    assert str(err.value) == (f"{tmp_path / 'x.pt'} holds weights of another architecture "
                              "(missing: weight, bias; unexpected: 0.weight, 0.bias); rerun the "
                              "stage that writes it")
    with pytest.raises(CheckpointError, match="shape mismatch: weight is 3x4, not 2x4, bias is "
                                              "3, not 2\\);"):
        load_weights(small, torch.nn.Linear(4, 3).state_dict(), "x.pt")
    weights = torch.nn.Linear(4, 2).state_dict()
    load_weights(small, weights, "x.pt")
    assert torch.equal(small.weight, weights["weight"])


@pytest.mark.parametrize("save", [
    lambda path: save_checkpoint(path, {"w": torch.zeros(1000)}, {"seed": 0}),
    lambda path: write_json(path, {"acc": 0.5}),
], ids=["checkpoint", "json"])
def test_a_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch, save):
    monkeypatch.setattr(os, "getpid", lambda: FAKE_PID)
    target = tmp_path / "out.pt"
    target.write_text("the previous result")
    (tmp_path / f".out.pt.tmp-{FAKE_PID}").symlink_to("/dev/full")
    with pytest.raises(CheckpointError) as err:
        save(target)
    assert str(err.value) == (f"no space left on device while writing {target}; free some space "
                              "and rerun the stage")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]
    assert target.read_text() == "the previous result"


# --- servers, loads, extraction --------------------------------------------------------------

def test_the_mlflow_servers_bind_to_localhost_by_default():
    """`make ui` and `make server` as make would run them (variables expanded, setup skipped):
    each mlflow command listens on 127.0.0.1 unless the user says otherwise."""
    env = {k: v for k, v in os.environ.items() if k not in ("SERVER_HOST", "UI_PORT")}
    for target in ("ui", "server"):
        commands = subprocess.run(["make", "-n", "-o", "setup", target], cwd=ROOT, env=env,
                                  capture_output=True, text=True, check=True).stdout
        command = re.search(r"mlflow (ui|server)\b.*", commands.replace("\\\n", " "))
        assert command, commands
        assert re.search(r"--host 127\.0\.0\.1\b", command.group(0)), command.group(0)
        assert "0.0.0.0" not in command.group(0)


def test_every_load_is_weights_only_and_every_extraction_filtered():
    """A static check of the sources: torch.load always with weights_only=True, tar extraction
    always with filter="data" (a new call without them fails here, not in an incident)."""
    import ast

    def keyword(call: ast.Call, name: str):
        return next((k.value.value for k in call.keywords
                     if k.arg == name and isinstance(k.value, ast.Constant)), None)

    seen = {"load": 0, "extract": 0}
    for path in [*(ROOT / "src").rglob("*.py"), *(ROOT / "stages").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            if node.func.attr == "load" and ast.unparse(node.func.value) == "torch":
                seen["load"] += 1
                assert keyword(node, "weights_only") is True, where
            if node.func.attr in ("extract", "extractall"):
                seen["extract"] += 1
                assert keyword(node, "filter") == "data", where
    assert seen["load"] >= 2 and seen["extract"] >= 1

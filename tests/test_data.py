"""Tests for aelab.data: the shapes generator, prepare/load for every source, and its failures."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100

from aelab.data import (
    SHAPES_CLASSES, DataError, label_subset, load_meta, load_split, make_shapes, prepare,
    write_cifar_archive,
)

CIFAR = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def hashes(images: torch.Tensor) -> list[str]:
    """One content hash per image [N, 3, H, W]."""
    return [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in images]


def leftovers(parent: Path) -> list[str]:
    """Temp/old dirs that prepare should have cleaned up."""
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# --- shapes generator ---------------------------------------------------------------------------

def test_make_shapes_types_shapes_and_balance():
    x, y = make_shapes(200, seed=3)
    assert x.shape == (200, 3, 32, 32) and x.dtype == torch.uint8 and x.is_contiguous()
    assert y.shape == (200,) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [20] * 10
    assert len(SHAPES_CLASSES) == len(set(SHAPES_CLASSES)) == 10
    assert x.float().std() > 30  # real content, not a blank canvas
    assert make_shapes(30, seed=3, image_size=24)[0].shape == (30, 3, 24, 24)


def test_make_shapes_is_deterministic_in_seed():
    x1, y1 = make_shapes(150, seed=7)
    x2, y2 = make_shapes(150, seed=7)
    x3, y3 = make_shapes(150, seed=8)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3) and not torch.equal(y1, y3)
    assert not set(hashes(x1)) & set(hashes(x3))


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float,
         weight_decay: float = 0.0) -> nn.Module:
    """A few seeded epochs of AdamW + one-cycle; images normalised per batch from uint8."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    batch = 64
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model((x[idx].float() - 128) / 64), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model((x.float() - 128) / 64).argmax(1) == y).float().mean().item()


def test_shapes_need_a_conv_net_not_a_linear_model():
    """The dataset is learnable, but not from raw pixels by a linear model (~13 % vs ~65 %)."""
    torch.manual_seed(0)
    x_train, y_train = make_shapes(3000, seed=0)
    x_test, y_test = make_shapes(1000, seed=1_000_003)

    linear = _fit(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)), x_train, y_train,
                  epochs=20, lr=3e-3, weight_decay=1e-2)

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())

    conv = nn.Sequential(block(3, 16), nn.MaxPool2d(2), block(16, 32), nn.MaxPool2d(2),
                         block(32, 64), nn.MaxPool2d(2), block(64, 64),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    conv = _fit(conv, x_train, y_train, epochs=6, lr=1e-2)

    acc_linear, acc_conv = _accuracy(linear, x_test, y_test), _accuracy(conv, x_test, y_test)
    print(f"shapes test accuracy: linear {acc_linear:.3f}, conv {acc_conv:.3f}")
    assert acc_conv > 0.40, acc_conv                    # chance is 0.10
    assert acc_conv > acc_linear + 0.10, (acc_linear, acc_conv)


# --- prepare: shapes ----------------------------------------------------------------------------

def test_prepare_shapes_writes_a_stratified_disjoint_split(tmp_path):
    out = tmp_path / "prepared" / "shapes"
    meta = prepare("shapes", out, seed=5, val_fraction=0.2, shapes_train=300, shapes_test=100)

    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.pt", "train.pt", "val.pt"]
    assert leftovers(out.parent) == []
    assert meta == load_meta(out) == json.loads((out / "meta.json").read_text())
    assert meta["dataset"] == "shapes" and meta["classes"] == SHAPES_CLASSES
    assert meta["num_classes"] == 10 and meta["image_size"] == 32 and meta["seed"] == 5
    assert meta["source"] == "generated" and meta["val_fraction"] == 0.2
    assert meta["sizes"] == {"train": 240, "val": 60, "test": 100}

    split = {s: load_split(out, s) for s in ("train", "val", "test")}
    for s, (x, y) in split.items():
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) and x.is_contiguous()
        assert y.dtype == torch.int64 and len(y) == len(x) == meta["sizes"][s]
    # Stratified: every class gives round(0.2 * 30) = 6 of its 30 training images to val.
    assert torch.bincount(split["val"][1], minlength=10).tolist() == [6] * 10
    assert torch.bincount(split["train"][1], minlength=10).tolist() == [24] * 10
    # Disjoint, and the train+val pool is exactly the generated training stream.
    h = {s: set(hashes(x)) for s, (x, _) in split.items()}
    assert len(h["train"]) == 240 and len(h["val"]) == 60
    assert not h["train"] & h["val"] and not (h["train"] | h["val"]) & h["test"]
    assert h["train"] | h["val"] == set(hashes(make_shapes(300, seed=5)[0]))


def test_label_subset_is_stratified_deterministic_nested_and_train_only(tmp_path):
    out = tmp_path / "p"
    prepare("shapes", out, seed=5, val_fraction=0.2, shapes_train=300, shapes_test=50)
    train_x, train_y = load_split(out, "train")  # 24 per class
    tenth = label_subset(train_y.numpy(), 0.1, seed=5)
    # round(0.1 * 24) = 2 per class, at least one per class even at a tiny fraction
    assert np.bincount(train_y.numpy()[tenth], minlength=10).tolist() == [2] * 10
    assert np.bincount(train_y.numpy()[label_subset(train_y.numpy(), 0.001, 5)]).tolist() == \
        [1] * 10
    assert np.array_equal(tenth, label_subset(train_y.numpy(), 0.1, seed=5))  # deterministic
    assert not np.array_equal(tenth, label_subset(train_y.numpy(), 0.1, seed=6))
    half = label_subset(train_y.numpy(), 0.5, seed=5)
    assert set(tenth) <= set(half)  # nested: 10 % of labels are among the 50 %
    assert np.array_equal(label_subset(train_y.numpy(), 1.0, 5), np.arange(240))
    # the labelled images are training images, none of them in validation
    val = set(hashes(load_split(out, "val")[0]))
    assert not set(hashes(train_x[torch.from_numpy(tenth)])) & val
    with pytest.raises(DataError, match="label_fraction"):
        label_subset(train_y.numpy(), 0.0, 5)


def test_prepare_is_reproducible_and_replaces_old_output(tmp_path):
    args = dict(seed=1, val_fraction=0.1, shapes_train=200, shapes_test=50)
    prepare("shapes", tmp_path / "a", **args)
    prepare("shapes", tmp_path / "b", **args)
    (tmp_path / "b" / "stale.txt").write_text("from an older build")
    prepare("shapes", tmp_path / "b", **args)  # rebuild over an existing dir
    assert not (tmp_path / "b" / "stale.txt").exists()
    for s in ("train", "val", "test"):
        for ta, tb in zip(load_split(tmp_path / "a", s), load_split(tmp_path / "b", s)):
            assert torch.equal(ta, tb)
    assert load_meta(tmp_path / "a") == load_meta(tmp_path / "b")
    other = prepare("shapes", tmp_path / "c", **{**args, "seed": 2})
    assert other["sizes"] == load_meta(tmp_path / "a")["sizes"]
    assert not torch.equal(load_split(tmp_path / "c", "val")[0],
                           load_split(tmp_path / "a", "val")[0])


def test_limits_keep_stratified_subsets_before_the_val_split(tmp_path):
    meta = prepare("shapes", tmp_path / "p", seed=0, val_fraction=0.25, train_limit=80,
                   test_limit=40, shapes_train=200, shapes_test=100)
    assert meta["sizes"] == {"train": 60, "val": 20, "test": 40}
    for s, per_class in (("train", 6), ("val", 2), ("test", 4)):
        assert torch.bincount(load_split(tmp_path / "p", s)[1], minlength=10).tolist() == \
            [per_class] * 10


def test_load_errors_name_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="prepare stage") as e:
        load_split(missing, "train")
    assert str(missing / "train.pt") in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="prepare stage"):
        load_meta(missing)
    with pytest.raises(DataError, match="unknown split"):
        load_split(missing, "validation")
    missing.mkdir()
    (missing / "train.pt").write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable"):
        load_split(missing, "train")


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset="mnist"), "shapes, cifar10, cifar100, imagefolder"),
    (dict(val_fraction=0.0), "val_fraction"),
    (dict(val_fraction=1.0), "val_fraction"),
    (dict(train_limit=-1), "train_limit"),
    (dict(shapes_train=5), "shapes_train"),
])
def test_bad_arguments_fail_and_remove_old_output(tmp_path, kwargs, message):
    out = tmp_path / "out"
    prepare("shapes", out, seed=0, val_fraction=0.5, shapes_train=20, shapes_test=10)
    args = dict(dataset="shapes", seed=0, val_fraction=0.5, shapes_train=20, shapes_test=10)
    args.update(kwargs)
    with pytest.raises(DataError, match=message):
        prepare(args.pop("dataset"), out, **args)
    assert not out.exists() and leftovers(tmp_path) == []


# --- prepare: CIFAR -----------------------------------------------------------------------------

def _archive(tmp_path: Path, dataset: str, n_train: int = 60, n_test: int = 20) -> Path:
    path = tmp_path / "external" / CIFAR[dataset].filename
    write_cifar_archive(path, dataset, n_train, n_test, seed=4)
    return path


def _decode_member(archive: Path, member: str) -> dict:
    """Decode one member of our own test archive with plain pickle (independent of aelab)."""
    with tarfile.open(archive) as tar:
        return pickle.loads(tar.extractfile(member).read(), encoding="latin1")


@pytest.mark.parametrize("dataset, num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_prepare_cifar_from_an_external_archive(tmp_path, dataset, num_classes):
    archive = _archive(tmp_path, dataset)
    out = tmp_path / "prepared"
    meta = prepare(dataset, out, seed=0, val_fraction=0.2, external_dir=archive.parent,
                   download_dir=tmp_path / "downloads", verify_checksum=False)
    assert meta["num_classes"] == num_classes == len(meta["classes"])
    assert meta["classes"][:2] == ["class_00", "class_01"]
    assert meta["source"] == archive.name
    assert meta["sizes"]["train"] + meta["sizes"]["val"] == 60 and meta["sizes"]["test"] == 20

    cls = CIFAR[dataset]
    label_key = "labels" if dataset == "cifar10" else "fine_labels"
    batches = [_decode_member(archive, f"{cls.base_folder}/{f}") for f, _ in cls.train_list]
    expected = {hashlib.sha1(row.reshape(3, 32, 32).tobytes()).hexdigest(): label
                for b in batches for row, label in zip(b["data"], b[label_key])}
    for split in ("train", "val"):
        x, y = load_split(out, split)
        assert x.shape[1:] == (3, 32, 32)
        assert [expected[h] for h in hashes(x)] == y.tolist()  # images keep their own labels
    test = _decode_member(archive, f"{cls.base_folder}/{cls.test_list[0][0]}")
    x, y = load_split(out, "test")
    assert torch.equal(x, torch.from_numpy(test["data"]).reshape(-1, 3, 32, 32))
    assert y.tolist() == test[label_key]


def test_write_cifar_archive_is_deterministic_and_not_the_real_one(tmp_path):
    md5 = write_cifar_archive(tmp_path / "a.tar.gz", "cifar10", 10, 5, seed=1)
    assert md5 == write_cifar_archive(tmp_path / "b.tar.gz", "cifar10", 10, 5, seed=1)
    assert md5 == hashlib.md5((tmp_path / "a.tar.gz").read_bytes()).hexdigest() != CIFAR10.tgz_md5


def test_checksum_mismatch_fails_and_leaves_no_output(tmp_path):
    archive = _archive(tmp_path, "cifar10")
    out = tmp_path / "prepared"
    with pytest.raises(DataError, match="checksum mismatch") as e:
        prepare("cifar10", out, seed=0, val_fraction=0.2, external_dir=archive.parent,
                download_dir=tmp_path / "downloads", verify_checksum=True)
    assert CIFAR10.tgz_md5 in str(e.value) and "verify_checksum: false" in str(e.value)
    assert "\n" not in str(e.value)
    assert not out.exists() and leftovers(tmp_path) == []
    assert archive.exists()  # the user's own file is never deleted


@pytest.mark.parametrize("damage", ["truncated", "not_a_tar"])
def test_broken_archives_fail_cleanly(tmp_path, damage):
    archive = _archive(tmp_path, "cifar100", n_train=200, n_test=50)
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"<html>" * 500)
    out = tmp_path / "prepared"
    with pytest.raises(DataError) as e:
        prepare("cifar100", out, seed=0, val_fraction=0.2, external_dir=archive.parent,
                download_dir=tmp_path / "downloads", verify_checksum=False)
    assert str(archive) in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and leftovers(tmp_path) == []


def test_offline_without_archive_says_where_to_put_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    external, downloads = tmp_path / "data" / "external", tmp_path / "data" / "downloads"
    with pytest.raises(DataError) as e:
        prepare("cifar100", tmp_path / "prepared", seed=0, val_fraction=0.1,
                external_dir=external, download_dir=downloads)
    message = str(e.value)
    assert CIFAR100.url in message and str(external / CIFAR100.filename) in message
    assert "name resolution" in message and "dvc" in message and "\n" not in message
    assert not (tmp_path / "prepared").exists()
    assert not downloads.exists() or list(downloads.iterdir()) == []  # no .part left behind


def test_download_is_saved_once_and_reused(tmp_path, monkeypatch):
    source = _archive(tmp_path / "server", "cifar10")
    calls = []

    class Response(io.BytesIO):
        headers = {"Content-Length": str(source.stat().st_size)}

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return Response(source.read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    args = dict(seed=0, val_fraction=0.2, external_dir=tmp_path / "external",
                download_dir=tmp_path / "downloads", verify_checksum=False)
    prepare("cifar10", tmp_path / "p1", **args)
    prepare("cifar10", tmp_path / "p2", **args)
    assert calls == [CIFAR10.url]
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == [CIFAR10.filename]
    assert torch.equal(load_split(tmp_path / "p1", "val")[0], load_split(tmp_path / "p2", "val")[0])


def _rewrite_members(src: Path, dst: Path, change) -> None:
    """Copy a tar.gz, passing each member's bytes through change(name, blob)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as tin, tarfile.open(dst, "w:gz") as tout:
        for member in tin:
            blob = change(member.name, tin.extractfile(member).read())
            member.size = len(blob)
            tout.addfile(member, io.BytesIO(blob))


def test_an_archive_repacked_by_python3_still_loads(tmp_path):
    """Python 3 protocol-2 pickles have str keys and rebuild bytes via _codecs.encode."""
    original = _archive(tmp_path / "orig", "cifar10")
    repacked = tmp_path / "external" / original.name
    _rewrite_members(original, repacked, lambda name, blob: pickle.dumps(
        pickle.loads(blob, encoding="latin1"), protocol=2))
    assert b"_codecs" in pickle.dumps({"x": b"\xff"}, protocol=2)
    for source, out in ((original, "a"), (repacked, "b")):
        prepare("cifar10", tmp_path / out, seed=0, val_fraction=0.2, external_dir=source.parent,
                download_dir=tmp_path / "dl", verify_checksum=False)
    for split in ("train", "val", "test"):
        for ta, tb in zip(load_split(tmp_path / "a", split), load_split(tmp_path / "b", split)):
            assert torch.equal(ta, tb)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_is_refused(tmp_path):
    good = _archive(tmp_path / "good", "cifar10")
    evil = tmp_path / "external" / good.name
    marker = tmp_path / "pwned"
    target = f"{CIFAR10.base_folder}/data_batch_1"
    _rewrite_members(good, evil, lambda name, blob: (
        pickle.dumps(_Exploit(marker), protocol=2) if name == target else blob))
    with pytest.raises(DataError, match="refusing to load global") as e:
        prepare("cifar10", tmp_path / "prepared", seed=0, val_fraction=0.2,
                external_dir=evil.parent, download_dir=tmp_path / "dl", verify_checksum=False)
    assert "data_batch_1" in str(e.value)
    assert not marker.exists() and not (tmp_path / "prepared").exists()


# --- prepare: image folder ----------------------------------------------------------------------

def _image_folder(root: Path, train: dict[str, int], test: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split, counts in (("train", train), ("test", test)):
        for name, n in counts.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                size = (32, 32) if i == 0 else (40, 28)  # the rest need resizing
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                suffix = "png" if i % 2 == 0 else "jpg"
                Image.fromarray(pixels).save(root / split / name / f"{i}.{suffix}")


def test_prepare_image_folder(tmp_path):
    root = tmp_path / "images"
    _image_folder(root, train={"dog": 3, "cat": 4}, test={"dog": 2, "cat": 1})
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    meta = prepare("imagefolder", tmp_path / "p", seed=0, val_fraction=0.3, imagefolder=root)
    assert meta["classes"] == ["cat", "dog"] and meta["num_classes"] == 2
    assert meta["source"] == str(root)
    # val: round(0.3 * 4) = 1 cat, round(0.3 * 3) = 1 dog
    assert meta["sizes"] == {"train": 5, "val": 2, "test": 3}
    x_train, y_train = load_split(tmp_path / "p", "train")
    x_val, y_val = load_split(tmp_path / "p", "val")
    assert x_train.shape == (5, 3, 32, 32) and x_val.shape == (2, 3, 32, 32)
    assert sorted(torch.cat([y_train, y_val]).tolist()) == [0] * 4 + [1] * 3
    # A 32x32 PNG is taken as is, pixel for pixel (no resampling).
    exact = torch.from_numpy(np.array(Image.open(root / "train" / "dog" / "0.png")))
    exact = exact.permute(2, 0, 1)
    assert any(torch.equal(exact, img) for img in torch.cat([x_train, x_val]))


def test_image_folder_errors(tmp_path):
    root = tmp_path / "images"
    with pytest.raises(DataError, match="not found") as e:
        prepare("imagefolder", tmp_path / "p", seed=0, val_fraction=0.3, imagefolder=root)
    assert str(root) in str(e.value) and "train/<class>" in str(e.value)
    _image_folder(root, train={"cat": 2, "dog": 2}, test={"cat": 1, "bird": 1})
    with pytest.raises(DataError, match="differ"):
        prepare("imagefolder", tmp_path / "p", seed=0, val_fraction=0.3, imagefolder=root)
    assert not (tmp_path / "p").exists()


def test_image_folder_layout_is_checked_before_decoding(tmp_path):
    """Fewer than two classes, or an empty folder, fail before any image is decoded (the one
    image here is not an image at all, and is never read)."""
    root = tmp_path / "images"
    root.mkdir()
    with pytest.raises(DataError, match="is empty") as e:
        prepare("imagefolder", tmp_path / "p", seed=0, val_fraction=0.3, imagefolder=root)
    assert str(root) in str(e.value)
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
        (root / split / "cat" / "0.png").write_text("not an image")
    with pytest.raises(DataError) as e:
        prepare("imagefolder", tmp_path / "p", seed=0, val_fraction=0.3, imagefolder=root)
    assert str(e.value) == (f"{root / 'train'}: only one class folder ('cat'); a classifier "
                            "needs at least two classes")
    (root / "train" / "dog").mkdir()
    (root / "test" / "dog").mkdir()
    with pytest.raises(DataError, match=r"no images \(.*\) for \['dog'\]"):
        prepare("imagefolder", tmp_path / "p", seed=0, val_fraction=0.3, imagefolder=root)
    assert not (tmp_path / "p").exists() and leftovers(tmp_path) == []


def _with_member(src: Path, dst: Path, info: tarfile.TarInfo, blob: bytes = b"") -> None:
    """Copy a tar.gz and add one member."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as tin, tarfile.open(dst, "w:gz") as tout:
        for member in tin:
            tout.addfile(member, tin.extractfile(member))
        info.size = len(blob)
        tout.addfile(info, io.BytesIO(blob))


@pytest.mark.parametrize("kind", ["dotdot", "link_out", "absolute"])
def test_an_archive_with_an_unsafe_member_is_refused(tmp_path, kind):
    """tarfile's "data" filter: a member that would land outside the extraction folder (`..`, or
    a link out of it) refuses the whole archive; an absolute name is made relative to it (the
    filter strips the leading /). Either way nothing is written outside."""
    good = _archive(tmp_path / "good", "cifar10")
    outside = tmp_path / "outside" / "evil"  # where each unsafe member points
    outside.parent.mkdir()
    extract_dir = Path(tempfile.gettempdir()) / "aelab-cifar-x"  # where prepare extracts
    info = {"dotdot": tarfile.TarInfo(os.path.relpath(outside, extract_dir)),
            "link_out": tarfile.TarInfo(f"{CIFAR10.base_folder}/evil"),
            "absolute": tarfile.TarInfo(str(outside))}[kind]
    if kind == "link_out":
        info.type, info.linkname = tarfile.SYMTYPE, str(outside)
    evil = tmp_path / "external" / good.name
    _with_member(good, evil, info, b"" if kind == "link_out" else b"pwned")
    args = dict(seed=0, val_fraction=0.2, external_dir=evil.parent, download_dir=tmp_path / "dl",
                verify_checksum=False)
    if kind == "absolute":
        prepare("cifar10", tmp_path / "prepared", **args)
    else:
        with pytest.raises(DataError) as e:
            prepare("cifar10", tmp_path / "prepared", **args)
        reason = {"dotdot": "which is outside the destination",
                  "link_out": "is a link to an absolute path"}[kind]
        assert str(e.value).startswith(f"{evil}: refusing an unsafe archive (")
        assert reason in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "prepared").exists()
    assert list(outside.parent.iterdir()) == []


def test_a_full_disk_while_writing_is_one_line(tmp_path, monkeypatch):
    """Every write of the prepared files goes to /dev/full (the kernel's ENOSPC)."""
    import builtins
    import sys

    monkeypatch.setattr(sys.modules["aelab.data.prepare"], "open",
                        lambda path, mode: builtins.open("/dev/full", mode), raising=False)
    out = tmp_path / "prepared"
    with pytest.raises(DataError) as e:
        prepare("shapes", out, seed=0, val_fraction=0.5, shapes_train=20, shapes_test=10)
    assert str(e.value) == (f"no space left on device while writing {out}; free some space and "
                            "rerun the prepare stage")
    assert not out.exists() and leftovers(tmp_path) == []

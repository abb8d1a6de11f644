"""Build a dataset once into uint8 tensors plus a fixed, stratified train/val split; load it back.

Layout of a prepared directory:
    train.pt, val.pt, test.pt   {"images": uint8 [N, 3, 32, 32], "labels": int64 [N]}
    meta.json                   dataset, classes, sizes, seed, val_fraction, source
Validation images come from the training set only; test images are only ever written to test.pt.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .cifar import CIFAR_SOURCES, find_archive, load_cifar
from .errors import DataError
from .folder import load_image_folder
from .shapes import SHAPES_CLASSES, make_shapes

DATASETS = ("shapes", "cifar10", "cifar100", "imagefolder")
SPLITS = ("train", "val", "test")
IMAGE_SIZE = 32
_TEST_SEED_OFFSET = 1_000_003  # shapes test stream: never the same images as train
# Independent random streams per decision, so e.g. changing test_limit never moves the val split.
_STREAM_TRAIN_LIMIT, _STREAM_TEST_LIMIT, _STREAM_VAL, _STREAM_LABELS = 1, 2, 3, 4


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def stratified_subset(labels: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of `total` items, each class keeping its share (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = total * counts / counts.sum()
    take = np.floor(quota).astype(int)
    # Hand the leftover items to the largest fractional parts (ties: lower class first).
    order = np.argsort(-(quota - take), kind="stable")
    take[order[: total - take.sum()]] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def stratified_val(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted val indices: round(fraction * count) per class, at least 1, never the whole class.

    A class with a single image keeps it in train (a classifier cannot learn an unseen class).
    """
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(max(1, _round_half_up(fraction * len(members))), len(members) - 1)
        picked.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def label_subset(labels, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the labelled share of a training split (the `label_fraction` protocol).

    Stratified: round(fraction * count) per class, at least one. Fixed by the data `seed`, and
    nested: each class is shuffled once and the first k are taken, so the images labelled at
    1 % are among those labelled at 10 %. `labels` is the train split only, so the subset is
    disjoint from validation by construction.
    """
    labels = np.asarray(labels)
    if not 0 < fraction <= 1:
        raise DataError(f"label_fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, _STREAM_LABELS])
    picked = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        picked.append(members[:max(1, _round_half_up(fraction * len(members)))])
    return np.sort(np.concatenate(picked))


def _load_source(dataset: str, *, seed: int, external_dir: Path, download_dir: Path,
                 verify_checksum: bool, shapes_train: int, shapes_test: int,
                 imagefolder: Path | None) -> tuple[dict, str]:
    """({"classes", "train": (x, y), "test": (x, y)}, source description) for one dataset."""
    if dataset == "shapes":
        data = {"classes": list(SHAPES_CLASSES),
                "train": make_shapes(shapes_train, seed, IMAGE_SIZE),
                "test": make_shapes(shapes_test, seed + _TEST_SEED_OFFSET, IMAGE_SIZE)}
        return data, "generated"
    if dataset in CIFAR_SOURCES:
        archive = find_archive(dataset, external_dir, download_dir, verify_checksum)
        return load_cifar(dataset, archive), archive.name
    if dataset == "imagefolder":
        root = Path(imagefolder) if imagefolder is not None else Path(external_dir) / "images"
        return load_image_folder(root, IMAGE_SIZE), str(root)
    raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def _check_args(dataset: str, seed: int, val_fraction: float, counts: dict[str, int]) -> None:
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}")
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    for name, value in counts.items():
        low = 0 if name.endswith("_limit") else len(SHAPES_CLASSES)
        if value < low:
            raise DataError(f"{name} must be >= {low}{' (0 = no limit)' if low == 0 else ''}, "
                            f"got {value}")


def _build(dataset: str, out_dir: Path, seed: int, val_fraction: float, train_limit: int,
           test_limit: int, **source_args) -> dict:
    """Decode the source, subset and split it, and write every file into out_dir."""
    data, source = _load_source(dataset, seed=seed, **source_args)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]

    def limit(x, y, n, stream):
        if 0 < n < len(y):
            rng = np.random.default_rng([seed, stream])
            keep = torch.from_numpy(stratified_subset(y.numpy(), n, rng))
            return x[keep], y[keep]
        return x, y

    x_train, y_train = limit(x_train, y_train, train_limit, _STREAM_TRAIN_LIMIT)
    x_test, y_test = limit(x_test, y_test, test_limit, _STREAM_TEST_LIMIT)
    val = stratified_val(y_train.numpy(), val_fraction, np.random.default_rng([seed, _STREAM_VAL]))
    is_val = np.zeros(len(y_train), dtype=bool)
    is_val[val] = True
    is_val = torch.from_numpy(is_val)
    splits = {"train": (x_train[~is_val], y_train[~is_val]),
              "val": (x_train[is_val], y_train[is_val]),
              "test": (x_test, y_test)}
    for split, (x, y) in splits.items():
        # Through a Python file: a full disk is then OSError ENOSPC, not torch's opaque error.
        with open(out_dir / f"{split}.pt", "wb") as fh:
            torch.save({"images": x.contiguous(), "labels": y.to(torch.int64).contiguous()}, fh)
    meta = {"dataset": dataset, "classes": data["classes"], "num_classes": len(data["classes"]),
            "image_size": IMAGE_SIZE, "sizes": {s: len(y) for s, (_, y) in splits.items()},
            "seed": int(seed), "val_fraction": val_fraction, "source": source}
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def prepare(dataset: str, out_dir: Path, *, seed: int, val_fraction: float, train_limit: int = 0,
            test_limit: int = 0, external_dir: Path = Path("data/external"),
            download_dir: Path = Path("data/downloads"), verify_checksum: bool = True,
            shapes_train: int = 12000, shapes_test: int = 2000,
            imagefolder: Path | None = None) -> dict:
    """Build the dataset once into out_dir; return the meta dict."""
    out_dir = Path(out_dir)
    # All or nothing: build in a sibling temp dir, then swap it in with renames.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    try:
        counts = {"train_limit": train_limit, "test_limit": test_limit}
        if dataset == "shapes":
            counts |= {"shapes_train": shapes_train, "shapes_test": shapes_test}
        _check_args(dataset, seed, val_fraction, counts)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        meta = _build(dataset, tmp, seed, val_fraction, train_limit, test_limit,
                      external_dir=Path(external_dir), download_dir=Path(download_dir),
                      verify_checksum=verify_checksum, shapes_train=shapes_train,
                      shapes_test=shapes_test, imagefolder=imagefolder)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException as err:
        # A failed build also removes any earlier out_dir: output left from other parameters
        # must never look current (DVC would cache it as this stage's result).
        for path in (tmp, old, out_dir):
            shutil.rmtree(path, ignore_errors=True)
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"no space left on device while writing {out_dir}; free some "
                            "space and rerun the prepare stage") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    return meta


def prepare_from_config(cfg, out_dir: Path, *, external_dir: Path = Path("data/external"),
                        download_dir: Path = Path("data/downloads")) -> dict:
    """`prepare` with the dataset and `data` settings of a validated params.yaml (a Config)."""
    d = cfg.data
    return prepare(cfg.dataset, out_dir, seed=cfg.seed, val_fraction=d.val_fraction,
                   train_limit=d.train_limit, test_limit=d.test_limit,
                   external_dir=external_dir, download_dir=download_dir,
                   verify_checksum=d.verify_checksum, shapes_train=d.shapes_train,
                   shapes_test=d.shapes_test, imagefolder=Path(d.imagefolder))


def _missing(path: Path) -> DataError:
    return DataError(f"{path} not found; run the prepare stage first (dvc repro prepare)")


def load_split(prepared_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N,3,H,W], labels int64 [N]) of split in {"train","val","test"}."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = Path(prepared_dir) / f"{split}.pt"
    if not path.is_file():
        raise _missing(path)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        x, y = blob["images"], blob["labels"]
    except Exception as e:  # truncated file, foreign pickle, wrong keys: all need a rebuild
        raise DataError(f"{path}: unreadable ({' '.join(str(e).split())}); "
                        "re-run the prepare stage") from None
    if x.dtype != torch.uint8 or x.ndim != 4 or y.dtype != torch.int64 or len(y) != len(x):
        raise DataError(f"{path}: not uint8 images [N,3,H,W] with int64 labels [N]; "
                        "re-run the prepare stage")
    return x, y


def data_digest(prepared_dir: Path) -> str:
    """A short digest of the data training reads (meta.json, train.pt, val.pt: md5 of their
    md5s), for resume fingerprints and MLflow's dataset inputs."""
    import hashlib

    from aelab.checkpoint import file_md5

    digest = hashlib.md5()
    for name in ("meta.json", "train.pt", "val.pt"):
        path = Path(prepared_dir) / name
        digest.update((file_md5(path) if path.is_file() else "-").encode())
    return digest.hexdigest()[:16]


def load_meta(prepared_dir: Path) -> dict:
    """The meta dict that prepare wrote (dataset, classes, sizes, ...)."""
    path = Path(prepared_dir) / "meta.json"
    if not path.is_file():
        raise _missing(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: invalid JSON ({e}); re-run the prepare stage") from None

"""CIFAR-10/100: find or download the archive, verify it, decode its pickles safely.

The source facts (URL, archive name, md5, member names) come from torchvision's dataset classes so
there is one place that knows them; we do not instantiate those classes because they re-hash every
member on each load. The wanted members are extracted with tarfile's "data" filter (no absolute
paths, no links out of the folder, no device files; an archive with any member it refuses is
refused whole) into a temporary folder that is removed afterwards, and their pickles are decoded
by a restricted unpickler.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import DataError

# dataset name -> (name of the torchvision class holding the source facts, display name, label key)
CIFAR_SOURCES = {
    "cifar10": ("CIFAR10", "CIFAR-10", "labels"),
    "cifar100": ("CIFAR100", "CIFAR-100", "fine_labels"),
}
_DOWNLOAD_TIMEOUT_S = 30


def _source(dataset: str):
    if dataset not in CIFAR_SOURCES:
        raise DataError(f"unknown CIFAR dataset {dataset!r}; choose one of {sorted(CIFAR_SOURCES)}")
    import torchvision.datasets  # deferred: 1.3 s of import that only CIFAR stages need

    class_name, name, label_key = CIFAR_SOURCES[dataset]
    return getattr(torchvision.datasets, class_name), name, label_key


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _one_line(reason: object) -> str:
    return " ".join(str(reason).split())


def _download(url: str, dest: Path, name: str, hint: Path) -> None:
    """Fetch `url` to `dest` through a .part file, so an interrupted download never looks done."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, \
                open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    f.write(block)
                    bar.update(len(block))
        os.replace(part, dest)
    except (urllib.error.URLError, OSError, ValueError) as e:
        part.unlink(missing_ok=True)
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise DataError(
            f"cannot download {name} from {url} ({_one_line(reason)}); download it yourself and "
            f"put it at {hint}, then run 'dvc commit data.dvc' (or 'dvc add {hint.parent}')"
        ) from None


def find_archive(dataset: str, external_dir: Path, download_dir: Path,
                 verify_checksum: bool = True) -> Path:
    """Path of a verified archive: the user's copy, a previous download, or a fresh download."""
    cls, name, _ = _source(dataset)
    candidates = [Path(external_dir) / cls.filename, Path(download_dir) / cls.filename]
    path = next((p for p in candidates if p.is_file()), None)
    downloaded = path is None
    if downloaded:
        path = candidates[1]
        _download(cls.url, path, name, hint=candidates[0])
    if verify_checksum:
        got = _md5(path)
        if got != cls.tgz_md5:
            if downloaded:  # our own broken download: drop it so the next run fetches again
                path.unlink(missing_ok=True)
            raise DataError(
                f"{path}: {name} checksum mismatch: expected {cls.tgz_md5}, got {got}; "
                "re-download it, or set data.verify_checksum: false for a re-packed archive"
            )
    return path


class _CifarUnpickler(pickle.Unpickler):
    """Allows only what CIFAR's pickles reference: numpy array reconstruction (and, for pickles
    written by Python 3 with protocol 2, `_codecs.encode` for the raw bytes). Anything else, e.g.
    a pickle that would call os.system, is refused before it can run."""

    def find_class(self, module: str, name: str):
        allowed = {
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _codecs_encode,
        }
        if (module, name) in allowed:
            return allowed[module, name]
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _reconstruct()
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _codecs_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """What Python 3 protocol-2 pickles call to rebuild bytes; limited to latin1."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


def _reconstruct():
    """numpy's array-rebuild helper, wherever this numpy keeps it (moved to numpy._core in 2.0)."""
    try:
        from numpy._core.multiarray import _reconstruct as fn
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct as fn
    return fn


def _unpickle(blob: bytes, where: str) -> dict:
    """Decode one CIFAR member (a Python 2 pickle of a dict) into a dict with str keys."""
    try:
        obj = _CifarUnpickler(io.BytesIO(blob), encoding="latin1").load()
    except Exception as e:  # any malformed or refused pickle is the file's fault, not ours
        raise DataError(f"{where}: not a valid CIFAR pickle ({_one_line(e)})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _read_members(path: Path, wanted: set[str]) -> dict[str, bytes]:
    """Extract the regular-file members named in `wanted` (filter="data") and return their bytes.

    An archive with any member the "data" filter refuses (`..` out of the folder, a link
    pointing out of it, a device file) is refused whole: CIFAR has none. (The filter makes an
    absolute name relative to the folder.)
    """
    try:
        with tempfile.TemporaryDirectory(prefix="aelab-cifar-") as tmp, \
                tarfile.open(path, "r:*") as tar:
            for member in tar.getmembers():
                tarfile.data_filter(member, tmp)  # raises tarfile.FilterError
            members = [m for m in tar.getmembers()
                       if m.isfile() and m.name.removeprefix("./") in wanted]
            tar.extractall(tmp, members=members, filter="data")
            # Read on to the end so gzip checks its CRC and length trailer too.
            while tar.fileobj.read(1 << 20):
                pass
            found = {m.name.removeprefix("./"): (Path(tmp) / m.name).read_bytes()
                     for m in members}
    except tarfile.FilterError as e:
        raise DataError(f"{path}: refusing an unsafe archive ({_one_line(e)})") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path}: corrupt or truncated archive ({_one_line(e)})") from None
    missing = sorted(wanted - found.keys())
    if missing:
        raise DataError(f"{path}: archive lacks {', '.join(missing)}; is it the right dataset?")
    return found


def _split_arrays(batches: list[dict], label_key: str, num_classes: int, where: str):
    images, labels = [], []
    for i, batch in enumerate(batches):
        if "data" not in batch or label_key not in batch:
            raise DataError(f"{where}: a batch lacks the keys 'data' and {label_key!r}")
        data = batch["data"]
        y = np.asarray(batch[label_key], dtype=np.int64)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32 and len(y) == len(data)):
            raise DataError(f"{where}: batch {i} is not uint8 [N, 3072] with N labels")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"{where}: batch {i} has labels outside 0..{num_classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32))  # rows are R, G, B planes of 32x32
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def load_cifar(dataset: str, archive: Path) -> dict:
    """Decode an archive into {"classes", "train": (x, y), "test": (x, y)}; x uint8 [N,3,32,32]."""
    cls, name, label_key = _source(dataset)
    member = lambda file: f"{cls.base_folder}/{file}"  # noqa: E731
    train_names = [member(f) for f, _ in cls.train_list]
    test_names = [member(f) for f, _ in cls.test_list]
    meta_name = member(cls.meta["filename"])
    blobs = _read_members(Path(archive), {*train_names, *test_names, meta_name})

    meta = _unpickle(blobs[meta_name], f"{archive}:{meta_name}")
    classes = meta.get(cls.meta["key"])
    if not isinstance(classes, list) or not classes:
        raise DataError(f"{archive}:{meta_name}: no class list under {cls.meta['key']!r}")
    classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in classes]
    out = {"classes": classes}
    for split, names in (("train", train_names), ("test", test_names)):
        batches = [_unpickle(blobs[n], f"{archive}:{n}") for n in names]
        out[split] = _split_arrays(batches, label_key, len(classes), f"{archive} ({name} {split})")
    return out


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table is extensible
    """Protocol-2 pickler that writes bytes as Python 2 `str` (BINSTRING), as cPickle did for
    the real CIFAR files; with encoding="latin1" they load back as str (keys, names) and numpy
    accepts the latin1 str for the raw array data. (Python 3 would write `_codecs.encode` calls.)"""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def write_cifar_archive(path: Path, dataset: str, n_train: int, n_test: int, seed: int = 0) -> str:
    """Write a small random CIFAR archive in the real layout (for tests); return its md5.

    Same members as the real archive (`base_folder/<train_list, test_list, meta>`), each a
    Python-2-style protocol-2 pickle of a dict with the real keys and types: b"data" uint8
    [N, 3072] (R, G, B planes of 32x32), labels as a list of ints (b"labels" for CIFAR-10;
    b"fine_labels" and b"coarse_labels" for CIFAR-100), b"batch_label", b"filenames"; the meta
    member holds the class names. n_train is spread over the train batches like the real 5 x 10000.
    """
    cls, _, label_key = _source(dataset)
    rng = np.random.default_rng(seed)
    num_classes = 10 if dataset == "cifar10" else 100

    def batch(n: int, title: str) -> dict:
        labels = [int(v) for v in rng.integers(0, num_classes, n)]
        d = {b"batch_label": title.encode(), label_key.encode(): labels,
             b"data": rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8),
             b"filenames": [f"img_{i:05d}.png".encode() for i in range(n)]}
        if dataset == "cifar100":
            d[b"coarse_labels"] = [v // 5 for v in labels]
        return d

    per_batch = np.array_split(np.arange(n_train), len(cls.train_list))
    members = {f: batch(len(idx), f"training batch {i + 1} of {len(cls.train_list)}")
               for i, ((f, _), idx) in enumerate(zip(cls.train_list, per_batch))}
    members.update({f: batch(n_test, "testing batch 1 of 1") for f, _ in cls.test_list})
    meta = {cls.meta["key"].encode(): [f"class_{i:02d}".encode() for i in range(num_classes)]}
    if dataset == "cifar100":
        meta[b"coarse_label_names"] = [f"superclass_{i:02d}".encode() for i in range(20)]
    members[cls.meta["filename"]] = meta

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for file, content in members.items():
            buf = io.BytesIO()
            _Py2Pickler(buf, protocol=2).dump(content)
            # The real files name numpy's pre-2.0 module; GLOBAL is a text line, so swap it.
            blob = buf.getvalue().replace(b"cnumpy._core.multiarray\n_reconstruct\n",
                                          b"cnumpy.core.multiarray\n_reconstruct\n", 1)
            info = tarfile.TarInfo(f"{cls.base_folder}/{file}")
            info.size, info.mode = len(blob), 0o644
            tar.addfile(info, io.BytesIO(blob))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f, gzip.GzipFile("", "wb", fileobj=f, mtime=0) as gz:
        gz.write(raw.getvalue())  # no name, mtime 0: same inputs give the same bytes and md5
    return _md5(path)

"""A user's own images in torchvision's ImageFolder layout: `<root>/{train,test}/<class>/*`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_LAYOUT = "expected <root>/train/<class>/*.png and <root>/test/<class>/*.png (ImageFolder layout)"


def _class_dirs(split_dir: Path) -> dict[str, Path]:
    if not split_dir.is_dir():
        raise DataError(f"image folder {split_dir} not found; {_LAYOUT}")
    dirs = {d.name: d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")}
    if not dirs:
        raise DataError(f"image folder {split_dir} has no class directories; {_LAYOUT}")
    return dict(sorted(dirs.items()))


def _load_image(path: Path, size: int) -> np.ndarray:
    """One image as uint8 [3, size, size]: RGB, bicubic-resized when it is not size x size."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BICUBIC)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read image ({' '.join(str(e).split())})") from None


def _load_split(class_dirs: dict[str, Path], classes: list[str], size: int):
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in class_dirs[name].iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        images += [_load_image(p, size) for p in files]
        labels += [label] * len(files)
    x = np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8)
    return torch.from_numpy(x), torch.tensor(labels, dtype=torch.int64)


def load_image_folder(root: Path, size: int = 32) -> dict:
    """Decode `root` into {"classes", "train": (x, y), "test": (x, y)}; x uint8 [N,3,size,size]."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} not found; {_LAYOUT}")
    train_dirs, test_dirs = _class_dirs(root / "train"), _class_dirs(root / "test")
    classes = list(train_dirs)
    if set(test_dirs) != set(classes):
        only_train = sorted(set(classes) - set(test_dirs))
        only_test = sorted(set(test_dirs) - set(classes))
        raise DataError(f"{root}: train and test class folders differ "
                        f"(only in train: {only_train}, only in test: {only_test})")
    out = {"classes": classes}
    for split, dirs in (("train", train_dirs), ("test", test_dirs)):
        x, y = _load_split(dirs, classes, size)
        out[split] = (x, y)
    counts = torch.bincount(out["train"][1], minlength=len(classes))
    if (counts == 0).any():
        empty = [c for c, n in zip(classes, counts.tolist()) if n == 0]
        raise DataError(f"{root / 'train'}: no images ({', '.join(IMAGE_EXTENSIONS)}) for {empty}")
    if len(out["test"][1]) == 0:
        raise DataError(f"{root / 'test'}: no images ({', '.join(IMAGE_EXTENSIONS)}); {_LAYOUT}")
    return out

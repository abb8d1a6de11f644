"""A user's own images in torchvision's ImageFolder layout: `<root>/{train,test}/<class>/*`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_LAYOUT = "expected <root>/train/<class>/*.png and <root>/test/<class>/*.png (ImageFolder layout)"


def _listdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as e:
        raise DataError(f"cannot read image folder {folder} ({e.strerror or e})") from None


def _class_dirs(split_dir: Path) -> dict[str, Path]:
    if not split_dir.is_dir():
        raise DataError(f"image folder {split_dir} not found; {_LAYOUT}")
    dirs = {d.name: d for d in _listdir(split_dir) if d.is_dir() and not d.name.startswith(".")}
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


def _image_files(class_dirs: dict[str, Path], classes: list[str]) -> list[list[Path]]:
    """Each class's image files (by extension), in class order."""
    return [sorted(p for p in _listdir(class_dirs[name])
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS) for name in classes]


def _decode(files: list[list[Path]], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = [_load_image(p, size) for class_files in files for p in class_files]
    labels = [label for label, class_files in enumerate(files) for _ in class_files]
    x = np.stack(images) if images else np.zeros((0, 3, size, size), np.uint8)
    return torch.from_numpy(x), torch.tensor(labels, dtype=torch.int64)


def load_image_folder(root: Path, size: int = 32) -> dict:
    """Decode `root` into {"classes", "train": (x, y), "test": (x, y)}; x uint8 [N,3,size,size].

    The layout is checked before any image is decoded: at least two classes, the same ones in
    train and test, every training class with images, a test split with images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} not found; {_LAYOUT}")
    if not _listdir(root):
        raise DataError(f"image folder {root} is empty; {_LAYOUT}")
    train_dirs, test_dirs = _class_dirs(root / "train"), _class_dirs(root / "test")
    classes = list(train_dirs)
    if len(classes) < 2:
        raise DataError(f"{root / 'train'}: only one class folder ({classes[0]!r}); a classifier "
                        "needs at least two classes")
    if set(test_dirs) != set(classes):
        only_train = sorted(set(classes) - set(test_dirs))
        only_test = sorted(set(test_dirs) - set(classes))
        raise DataError(f"{root}: train and test class folders differ "
                        f"(only in train: {only_train}, only in test: {only_test})")
    files = {"train": _image_files(train_dirs, classes), "test": _image_files(test_dirs, classes)}
    empty = [c for c, class_files in zip(classes, files["train"]) if not class_files]
    if empty:
        raise DataError(f"{root / 'train'}: no images ({', '.join(IMAGE_EXTENSIONS)}) for {empty}")
    if not any(files["test"]):
        raise DataError(f"{root / 'test'}: no images ({', '.join(IMAGE_EXTENSIONS)}); {_LAYOUT}")
    return {"classes": classes, **{split: _decode(f, size) for split, f in files.items()}}

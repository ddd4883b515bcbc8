"""Image data for VLM runs: any labelled or captioned image folder, and sklearn's digits.

``load_image_folder(path)`` reads either layout:

* classification: ``path/<class name>/<image files>`` (one subfolder per class; the class
  names are the subfolder names, sorted);
* captions: a JSON or CSV file mapping image file -> caption(s), given as ``path`` itself or
  found as ``captions.json`` / ``captions.csv`` inside the folder ``path``. Image paths in the
  file are relative to the file's folder. JSON: ``{"a.jpg": ["cap 1", "cap 2"], ...}``,
  ``{"a.jpg": "cap"}``, or ``[{"image": "a.jpg", "captions": [...]}, ...]`` (``"caption"``
  also accepted). CSV: a header with ``image`` and ``caption`` columns, one row per caption.

``digits_dataset(n_per_class)`` turns ``sklearn.datasets.load_digits`` (8x8, 16 grey levels,
1797 images) into RGB PIL images upscaled to ``size`` pixels (white digit on black, like
MNIST) with labels ``"zero"`` .. ``"nine"`` (``labels="words"``, the default: class names a
tokenizer knows as words, as in the paper's class-name dictionary) or ``"0"`` .. ``"9"``
(``labels="digits"``).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
CAPTION_FILES = ("captions.json", "captions.csv")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

ImageLike = Union[Image.Image, str, os.PathLike]


def load_image(image: ImageLike) -> Image.Image:
    """An RGB PIL image from a PIL image or a file path (ValueError naming a bad file)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if not isinstance(image, (str, os.PathLike)):
        raise ValueError(f"an image must be a PIL image or a file path, got {type(image).__name__}")
    path = Path(image)
    if not path.is_file():
        raise ValueError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}") from err


def image_name(image: ImageLike, index: int) -> str:
    """A name for ``image`` in metadata: its path, or ``<PIL WxH #index>``."""
    if isinstance(image, Image.Image):
        return f"<PIL {image.width}x{image.height} #{index}>"
    return str(image)


@dataclass
class ImageDataset:
    """Images with class labels or reference captions.

    images:   PIL images or file paths (loaded lazily with ``load_image``)
    labels:   class name of each image (classification), or None
    captions: reference captions of each image (captioning), or None
    classes:  the class names in order (empty for captions)
    names:    a short name per image (file path relative to the root, or ``digits/i``)
    """

    images: list
    labels: list[str] | None = None
    captions: list[list[str]] | None = None
    classes: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    root: str | None = None

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> Image.Image:
        return load_image(self.images[i])

    def subset(self, idx: Sequence[int]) -> "ImageDataset":
        idx = list(idx)
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return ImageDataset([self.images[i] for i in idx], pick(self.labels), pick(self.captions),
                            list(self.classes), pick(self.names) or [], self.root)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _check_readable(paths: list[Path], root: Path) -> None:
    bad = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as err:  # PIL raises many types for corrupt files
            bad.append(f"{p.relative_to(root) if p.is_relative_to(root) else p} ({type(err).__name__})")
    if bad:
        raise ValueError(f"{len(bad)} image(s) under {root} cannot be read: {', '.join(bad[:10])}"
                         f"{' ...' if len(bad) > 10 else ''}; remove or replace them")


def load_image_folder(path: str | os.PathLike, *, verify: bool = True) -> ImageDataset:
    """Read a class-per-subfolder folder or a captions file (module docstring).

    verify: open every image once (PIL ``verify``) and name the unreadable ones.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"image folder {path} does not exist")
    if path.is_file():
        return _load_captions(path, verify)
    for name in CAPTION_FILES:
        if (path / name).is_file():
            return _load_captions(path / name, verify)
    subdirs = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        loose = [p for p in path.iterdir() if _is_image(p)]
        hint = (f"it holds {len(loose)} images but no class subfolders; " if loose else
                "it is empty; ")
        raise ValueError(f"image folder {path}: {hint}put images in one subfolder per class "
                         f"(path/<class>/<image>) or add a {' or '.join(CAPTION_FILES)} file")
    images, labels, names = [], [], []
    empty = []
    for d in subdirs:
        files = sorted(p for p in d.iterdir() if _is_image(p))
        if not files:
            empty.append(d.name)
        images += files
        labels += [d.name] * len(files)
        names += [str(p.relative_to(path)) for p in files]
    if empty:
        raise ValueError(f"image folder {path}: class folder(s) {', '.join(empty)} hold no images "
                         f"(extensions {', '.join(IMAGE_EXTENSIONS)}); remove them or add images")
    if verify:
        _check_readable(images, path)
    return ImageDataset([str(p) for p in images], labels=labels, classes=[d.name for d in subdirs],
                        names=names, root=str(path))


def _caption_entries(file: Path) -> list[tuple[str, list[str]]]:
    """[(image relative path, [captions])] from a JSON or CSV captions file."""
    if file.suffix.lower() == ".json":
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"captions file {file} is not valid JSON ({err})") from err
        if isinstance(data, dict):
            items = list(data.items())
        elif isinstance(data, list) and all(isinstance(x, dict) for x in data):
            try:
                items = [(x["image"], x["captions"] if "captions" in x else x["caption"]) for x in data]
            except KeyError as err:
                raise ValueError(f"captions file {file}: every entry needs 'image' and 'caption' "
                                 f"or 'captions' keys (missing {err})") from None
        else:
            raise ValueError(f"captions file {file}: expected a JSON object image -> caption(s) "
                             "or a list of {'image': ..., 'captions': [...]} entries")
        out = []
        for image, caps in items:
            caps = [caps] if isinstance(caps, str) else caps
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise ValueError(f"captions file {file}: captions of {image!r} must be a string or "
                                 "a list of strings")
            out.append((str(image), caps))
        return out
    if file.suffix.lower() == ".csv":
        merged: dict[str, list[str]] = {}
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = [c.strip().lower() for c in reader.fieldnames or []]
            if "image" not in cols or "caption" not in cols:
                raise ValueError(f"captions file {file}: the CSV header must have 'image' and "
                                 f"'caption' columns (found {reader.fieldnames})")
            for row in reader:
                row = {k.strip().lower(): v for k, v in row.items() if k}
                merged.setdefault(row["image"].strip(), []).append(row["caption"])
        return list(merged.items())
    raise ValueError(f"captions file {file}: use a .json or .csv file")


def _load_captions(file: Path, verify: bool) -> ImageDataset:
    entries = _caption_entries(file)
    if not entries:
        raise ValueError(f"captions file {file} lists no images")
    root = file.parent
    missing = [img for img, _ in entries if not (root / img).is_file()]
    if missing:
        raise ValueError(f"captions file {file} names {len(missing)} image(s) that do not exist "
                         f"under {root}: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    no_caps = [img for img, caps in entries if not [c for c in caps if c.strip()]]
    if no_caps:
        raise ValueError(f"captions file {file}: image(s) {', '.join(no_caps[:10])} have no caption")
    paths = [root / img for img, _ in entries]
    if verify:
        _check_readable(paths, root)
    return ImageDataset([str(p) for p in paths], captions=[[c for c in caps if c.strip()] for _, caps in entries],
                        names=[img for img, _ in entries], root=str(root))


def digits_dataset(n_per_class: int = 10, size: int = 64, seed: int = 0, *,
                   labels: str = "words") -> ImageDataset:
    """``n_per_class`` images of each digit from ``sklearn.datasets.load_digits``.

    Each 8x8 image (grey levels 0..16) is scaled to 0..255, upscaled to ``size`` x ``size``
    with bilinear interpolation and converted to RGB. Images are drawn per class without
    replacement with ``seed``; order: class 0's images, then class 1's, ...
    labels: "words" -> "zero".."nine" (default), "digits" -> "0".."9".
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ValueError("digits_dataset needs scikit-learn: pip install scikit-learn") from err
    import numpy as np
    if labels not in ("words", "digits"):
        raise ValueError(f"labels={labels!r}: use 'words' (zero..nine) or 'digits' (0..9)")
    if int(size) < 8:
        raise ValueError(f"size={size} must be at least 8 pixels")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    names = list(DIGIT_WORDS) if labels == "words" else [str(d) for d in range(10)]
    images, labs, ids = [], [], []
    for d in range(10):
        pool = np.flatnonzero(digits.target == d)
        if n_per_class > len(pool) or n_per_class < 1:
            raise ValueError(f"n_per_class={n_per_class}: load_digits has {len(pool)} images of "
                             f"digit {d}; ask for 1..{len(pool)}")
        for i in sorted(rng.choice(pool, size=n_per_class, replace=False).tolist()):
            grey = (digits.images[i] / 16.0 * 255.0).round().astype(np.uint8)  # (8, 8)
            img = Image.fromarray(grey).resize((size, size), Image.BILINEAR)
            images.append(img.convert("RGB"))
            labs.append(names[d])
            ids.append(f"digits/{i}")
    return ImageDataset(images, labels=labs, classes=names, names=ids, root=None)


__all__ = ["ImageDataset", "load_image", "load_image_folder", "digits_dataset", "DIGIT_WORDS",
           "IMAGE_EXTENSIONS"]

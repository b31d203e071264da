"""Training data: prompt lists and the ImageReFL image + caption datasets.

- :func:`load_prompts`: ``data.prompts`` plus ``data.prompts_file`` (one prompt per line, ``#`` comments and blank
  lines skipped; or a ``.json`` list of strings / of objects with a ``prompt`` or ``caption`` field).
- :class:`ImageCaptionFolder`: a folder of images (png, jpg, jpeg, webp, bmp) each with a same-stem ``.txt``
  caption, searched recursively.
- :class:`HFImageCaptionDataset`: a Hugging Face dataset (``datasets`` is imported lazily; a clear error when it
  is not installed).

Image datasets return images ``[B, 3, S, S]`` in [0, 1]: resized so the short side is ``S`` (bicubic, PIL) and
center-cropped, RGB.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "DataError",
    "IMAGE_SUFFIXES",
    "load_prompts",
    "ImageCaptionFolder",
    "HFImageCaptionDataset",
    "pil_to_tensor",
    "open_image_dataset",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class DataError(ValueError):
    """Training data is missing or malformed."""


def load_prompts(prompts: Sequence[str] = (), prompts_file: str = "") -> list[str]:
    """Inline ``prompts`` followed by those of ``prompts_file``; DataError when the result is empty."""
    out = [p for p in prompts if p.strip()]
    if prompts_file:
        path = Path(prompts_file).expanduser()
        if not path.is_file():
            raise DataError(f"prompts file {str(path)!r} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                items = json.loads(text)
            except ValueError as exc:
                raise DataError(f"{path}: invalid JSON: {exc}") from exc
            if not isinstance(items, list):
                raise DataError(f"{path}: expected a JSON list of prompts")
            for i, item in enumerate(items):
                if isinstance(item, dict):
                    item = item.get("prompt", item.get("caption"))
                if not isinstance(item, str):
                    raise DataError(f"{path}: item {i} is not a string (or an object with a 'prompt' field)")
                if item.strip():
                    out.append(item.strip())
        else:
            out += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        where = f" in {prompts_file!r}" if prompts_file else ""
        raise DataError(f"no training prompts{where}: set data.prompts or data.prompts_file")
    return out


def pil_to_tensor(image: Any, size: int) -> torch.Tensor:
    """A PIL image -> ``[3, size, size]`` float in [0, 1]: RGB, short side resized to ``size`` (bicubic), centre crop."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    arr = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class ImageCaptionFolder:
    """Images with same-stem ``.txt`` captions under ``root`` (recursively), as a trainer data source.

    Args:
        root: the folder.
        size: output image size in pixels (square).

    Raises:
        DataError: the folder does not exist, holds no image, or an image has no (or an empty) caption.
    """

    def __init__(self, root: str | Path, size: int) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"dataset folder {str(self.root)!r} does not exist")
        self.size = int(size)
        images = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise DataError(f"dataset folder {str(self.root)!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
        missing = [p for p in images if not p.with_suffix(".txt").is_file()]
        if missing:
            raise DataError(f"{len(missing)} image(s) in {str(self.root)!r} have no caption file; each image needs a "
                            f"same-stem .txt, e.g. {missing[0].with_suffix('.txt')}")
        self.items: list[tuple[Path, str]] = []
        for p in images:
            caption = p.with_suffix(".txt").read_text(encoding="utf-8").strip()
            if not caption:
                raise DataError(f"caption file {p.with_suffix('.txt')} is empty")
            self.items.append((p, caption))

    def __len__(self) -> int:
        return len(self.items)

    def get(self, indices: Sequence[int]) -> tuple[list[str], torch.Tensor]:
        from PIL import Image

        captions, images = [], []
        for i in indices:
            path, caption = self.items[i]
            try:
                with Image.open(path) as im:
                    images.append(pil_to_tensor(im, self.size))
            except OSError as exc:
                raise DataError(f"cannot read image {path}: {exc}") from exc
            captions.append(caption)
        return captions, torch.stack(images)


class HFImageCaptionDataset:
    """A Hugging Face dataset with an image column and a caption column (a string or a list of strings; the
    first is used)."""

    def __init__(self, name: str, size: int, *, split: str = "train", image_column: str = "image",
                 caption_column: str = "caption") -> None:
        try:
            import datasets
        except ImportError as exc:
            raise DataError(f"data.dataset = {name!r} is a Hugging Face dataset, which needs the 'datasets' package "
                            f"(pip install datasets); or give a local folder of images with .txt captions") from exc
        try:
            self.ds = datasets.load_dataset(name, split=split)
        except Exception as exc:  # network, unknown name, split ...
            raise DataError(f"cannot load Hugging Face dataset {name!r} (split {split!r}): {exc}") from exc
        cols = list(self.ds.column_names)
        for col, key in ((image_column, "data.image_column"), (caption_column, "data.caption_column")):
            if col not in cols:
                raise DataError(f"dataset {name!r} has no column {col!r} ({key}); columns: {', '.join(cols)}")
        self.size, self.image_column, self.caption_column = int(size), image_column, caption_column

    def __len__(self) -> int:
        return len(self.ds)

    def get(self, indices: Sequence[int]) -> tuple[list[str], torch.Tensor]:
        captions, images = [], []
        for i in indices:
            row = self.ds[int(i)]
            caption = row[self.caption_column]
            if isinstance(caption, (list, tuple)):
                caption = caption[0] if caption else ""
            captions.append(str(caption))
            images.append(pil_to_tensor(row[self.image_column], self.size))
        return captions, torch.stack(images)


def open_image_dataset(dataset: str, size: int, *, split: str = "train", image_column: str = "image",
                       caption_column: str = "caption"):
    """A local folder (if it exists, or the name looks like a path) or a Hugging Face dataset (``hf:`` prefix
    forces the hub)."""
    if dataset.startswith("hf:"):
        return HFImageCaptionDataset(dataset[3:], size, split=split, image_column=image_column,
                                     caption_column=caption_column)
    path = Path(dataset).expanduser()
    if path.is_dir() or dataset.startswith(("/", ".", "~", "\\")) or dataset.count("/") != 1:
        return ImageCaptionFolder(path, size)
    return HFImageCaptionDataset(dataset, size, split=split, image_column=image_column, caption_column=caption_column)

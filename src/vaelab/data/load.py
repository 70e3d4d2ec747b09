"""`load_dataset`: a dataset name or path -> ImageData."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DataError
from .archives import load_celeba
from .arrays import load_array_file
from .core import ImageData
from .folders import Options, load_image_folder, parse_size
from .named import NAMES, REGISTRY, cache_dir, load_named
from .shapes import load_shapes


def load_dataset(dataset: str, data_dir: str | None = None, limit: int | None = None,
                 allow_download: bool = True, *, image_size=None, center_crop=None, background: str = "white",
                 skip_bad_images: bool = False, progress: bool = False) -> ImageData:
    """A named dataset (mnist, fashion-mnist, cifar10, dsprites, celeba, shapes) or a path to a .npz/.npy file
    or an image folder.

    Image folders: `image_size` (N or (H, W)) resizes the shorter side and centre-crops, `center_crop` crops
    first, transparent pixels are composited over `background` (white or black); `skip_bad_images` leaves
    undecodable files out instead of stopping at the first."""
    if (image_size is not None or center_crop is not None) and ((dataset in NAMES and dataset != "celeba")
                                                                 or not Path(dataset).expanduser().is_dir()):
        raise DataError(f"--image-size and --center-crop apply to image folders and celeba; --dataset {dataset} "
                        "has images of one size already")
    if dataset == "shapes":
        data = load_shapes(progress=progress)
    elif dataset == "celeba":
        dirs = [Path(d) for d in (data_dir, os.environ.get("VAELAB_DATA")) if d] + [cache_dir()]
        data = load_celeba(dirs, skip_bad_images, progress, image_size=image_size, center_crop=center_crop)
    elif dataset in REGISTRY:
        data = load_named(dataset, data_dir, allow_download, progress)
    else:
        path = Path(dataset).expanduser()
        if path.is_dir():
            opts = Options(parse_size(image_size, "--image-size"), parse_size(center_crop, "--center-crop"),
                           background)
            data = load_image_folder(path, opts, skip_bad_images, progress)
        elif path.is_file() and path.suffix.lower() in (".npz", ".npy"):
            data = load_array_file(path, progress)
        elif path.exists():
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .npz, .npy or an image folder")
        else:
            raise DataError(f"--dataset {dataset!r} is neither a named dataset ({', '.join(NAMES)}) "
                            "nor an existing .npz/.npy file or image folder")
    return data.limited(limit)

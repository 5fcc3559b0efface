"""Image datasets for the feature pipeline: lazy ImageFolder trees, globs and .npz arrays; a texture set."""

from __future__ import annotations

from rmidl.datasets._dataset import Batch, Dataset, from_dict, open_dataset
from rmidl.datasets._textures import TEXTURE_CLASSES, make_textures

open = open_dataset

__all__ = ["TEXTURE_CLASSES", "Batch", "Dataset", "from_dict", "make_textures", "open", "open_dataset"]

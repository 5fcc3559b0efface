"""Image datasets for the feature pipeline: lazy ImageFolder trees, globs and .npz arrays."""

from __future__ import annotations

from rmidl.datasets._dataset import Batch, Dataset, from_dict, open_dataset

open = open_dataset  # rmidl.datasets.open(path), like gzip.open

__all__ = ["Batch", "Dataset", "from_dict", "open", "open_dataset"]

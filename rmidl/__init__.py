"""rmidl: exact, fast convolution of images with kernel banks, on one core or a Pyro5 cluster.

The numeric library lives here; the cluster parts ship as `rmidl.server` and `rmidl.client`.
"""

from __future__ import annotations

from rmidl.activation import activate
from rmidl.banks import load_kernels
from rmidl.convolution import convolve, correlate
from rmidl.errors import (
    AuthenticationError,
    BankError,
    BankNotFound,
    BudgetExceeded,
    ClusterError,
    ConfigError,
    DTypeError,
    ImageNotFound,
    ImageReadError,
    InputError,
    KernelTooLarge,
    NonFiniteInput,
    OptionError,
    RegistryError,
    RmidlError,
    ShapeError,
    TaskFailed,
    WorkerLost,
    WorkerNotFound,
)
from rmidl.featureset import FeatureSet
from rmidl.history import History
from rmidl.imaging import load_image, save_image
from rmidl.mlp import MLP
from rmidl.network import Network, Stage
from rmidl.pooling import pool
from rmidl.training import train

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BankError",
    "BankNotFound",
    "BudgetExceeded",
    "ClusterError",
    "ConfigError",
    "DTypeError",
    "FeatureSet",
    "History",
    "ImageNotFound",
    "ImageReadError",
    "InputError",
    "KernelTooLarge",
    "MLP",
    "Network",
    "NonFiniteInput",
    "OptionError",
    "RegistryError",
    "RmidlError",
    "ShapeError",
    "Stage",
    "TaskFailed",
    "WorkerLost",
    "WorkerNotFound",
    "__version__",
    "activate",
    "convolve",
    "correlate",
    "load_image",
    "load_kernels",
    "pool",
    "save_image",
    "train",
]

"""Tabular regression data: UCI Concrete from the Debian package ``r-cran-modeldata``.

modeldata's ``concrete`` tibble (Yeh 1998): 1030 mixtures, eight inputs (seven ingredients in
kg/m³ and the age in days) and the compressive strength in MPa. Debian installs it inside R's
lazy-load data base ``/usr/lib/R/site-library/modeldata/data/Rdata.rdb`` (read by
:mod:`conditioner.app.data.rdb` with the PyPI package ``rdata``); the environment variable
``CONDITIONER_MODELDATA_DIR`` may name another folder holding ``Rdata.rdb`` and ``Rdata.rdx``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import numpy as np
import torch

from conditioner.app.data.base import Dataset, DataUnavailableError, register
from conditioner.app.data.rdb import read_object

MODELDATA_ENV = "CONDITIONER_MODELDATA_DIR"
MODELDATA_DIR = "/usr/lib/R/site-library/modeldata/data"
MODELDATA_INSTALL = "sudo apt-get install r-cran-modeldata"
RDATA_INSTALL = "pip install rdata"
CONCRETE_FEATURES = (
    "cement",
    "blast_furnace_slag",
    "fly_ash",
    "water",
    "superplasticizer",
    "coarse_aggregate",
    "fine_aggregate",
    "age",
)
CONCRETE_TARGET = "compressive_strength"
CONCRETE_VALIDATION = 134
"""Held-out mixtures: 1030 = 896 training + 134 validation, the split of the LDS literature."""


def modeldata_dir() -> Path:
    """The folder of modeldata's lazy-load data base: ``$CONDITIONER_MODELDATA_DIR`` or Debian's."""
    return Path(os.environ.get(MODELDATA_ENV) or MODELDATA_DIR)


def _missing(reason: str) -> DataUnavailableError:
    return DataUnavailableError(f"UCI Concrete is missing: {reason}; install it with `{MODELDATA_INSTALL}`.")


@functools.lru_cache(maxsize=2)
def _concrete_table(directory: Path) -> np.ndarray:
    """The read-only float64 table (N, 9): the eight inputs, then the strength."""
    try:
        frame = read_object(directory, "concrete")
        table = frame[[*CONCRETE_FEATURES, CONCRETE_TARGET]].to_numpy(dtype=np.float64)
    except (OSError, KeyError, ValueError, TypeError) as error:
        raise DataUnavailableError(
            f"UCI Concrete cannot be read from {directory} ({error}); "
            f"reinstall it with `{MODELDATA_INSTALL.replace('install', 'install --reinstall')}`."
        ) from error
    if table.ndim != 2 or len(table) <= CONCRETE_VALIDATION + 1 or not np.isfinite(table).all():
        raise DataUnavailableError(
            f"UCI Concrete in {directory} is not a finite table of more than {CONCRETE_VALIDATION + 1} rows."
        )
    table.flags.writeable = False
    return table


def concrete_table() -> np.ndarray:
    """modeldata's ``concrete`` as a read-only float64 array (1030, 9): the columns
    :data:`CONCRETE_FEATURES`, then :data:`CONCRETE_TARGET`, unscaled, in the package's order."""
    directory = modeldata_dir()
    if not ((directory / "Rdata.rdb").is_file() and (directory / "Rdata.rdx").is_file()):
        where = f"{directory} (set by {MODELDATA_ENV})" if os.environ.get(MODELDATA_ENV) else directory
        raise _missing(f"there is no lazy-load data base Rdata.rdb/Rdata.rdx in {where}")
    if importlib.util.find_spec("rdata") is None:
        raise DataUnavailableError(
            f"UCI Concrete cannot be read: the rdata package that parses R data is not installed; "
            f"install it with `{RDATA_INSTALL}`."
        )
    return _concrete_table(directory)


def concrete_split(num_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint (training, validation) row indices: a permutation seeded by ``seed``, its first
    :data:`CONCRETE_VALIDATION` rows held out."""
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return order[CONCRETE_VALIDATION:], order[:CONCRETE_VALIDATION]


def _standardise(train: torch.Tensor, val: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both parts shifted and scaled by the TRAINING columns' mean and (population) standard
    deviation, so nothing about the validation rows leaks into training; float32."""
    mean = train.mean(0)
    std = train.std(0, correction=0)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant column stays at zero
    return ((train - mean) / std).float(), ((val - mean) / std).float()


@register("concrete")
def load_concrete(seed: int) -> Dataset:
    """UCI Concrete compressive strength, a regression: ``x_*`` float32 (N, 8), ``y_*`` float32
    (N, 1); 896 training and 134 validation mixtures, split by ``seed``. Inputs and target are
    standardised with the training part's statistics only."""
    table = torch.tensor(concrete_table())
    train, val = concrete_split(len(table), seed)
    x_train, x_val = _standardise(table[train, :-1], table[val, :-1])
    y_train, y_val = _standardise(table[train, -1:], table[val, -1:])
    return Dataset("concrete", "regression", x_train, y_train, x_val, y_val, 1, (len(CONCRETE_FEATURES),))

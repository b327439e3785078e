"""Real data sets that work offline: every loader reads data shipped inside an installed package.

``load_dataset(name, seed)`` returns a :class:`Dataset` with a fixed, seeded split; a data set
whose package is missing raises :class:`DataUnavailableError` whose message is the exact command
that installs it. Nothing is ever downloaded at run time.
"""

from conditioner.data.base import DATASETS, Dataset, DataUnavailableError, load_dataset

__all__ = ["DATASETS", "DataUnavailableError", "Dataset", "load_dataset"]

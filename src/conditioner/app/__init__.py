"""The ``conditioner`` command-line app on top of the library: ``bench``, ``spectrum`` and the
``influence`` experiments, with their data sets, model zoo, training loop, plots and reports.

Install it with the ``app`` extra (``pip install "conditioner[app]"``); the library itself
(everything outside this package) needs torch alone and never imports it.
"""

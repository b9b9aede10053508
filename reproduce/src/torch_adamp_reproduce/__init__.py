"""The ``torch-adamp`` command and what it runs: the paper's toy problems, the Fashion-MNIST comparison,
one small offline task per family of the paper's benchmarks (``tasks``), their plots and their data.

A package of its own beside the library (``reproduce/`` of the torch-adamp repository), so that the
library's wheel holds the optimizers alone.
"""

__version__ = "0.1.0"

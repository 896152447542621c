"""IMPALA in PyTorch.

Importing the package starts nothing and imports no optional engine (Ray); the command line is
`impala` (see `impala.cli`).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]

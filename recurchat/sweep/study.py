"""`recurchat sweep`: an Optuna study whose trials are ordinary training runs.

    recurchat sweep --study runs/depth --preset cpu-tiny --max-steps 400 \\
        --grid 'adapter_init=e,mean;state_norm=false,true' --standard iso-params,iso-flops
    recurchat sweep --study runs/lr --preset cpu-tiny --max-steps 200 --search 'lr_matrix=log:0.005..0.05' --trials 8

The plan (sweep/space.py) is enqueued once into the study; every worker — this process, another on the same SQLite
file, or another machine on a shared PostgreSQL/MySQL URL (`--storage`) — takes the next waiting trial until none
is left. A trial trains `DIR/trials/NNNN` with the same trainer, checkpoints and metrics.jsonl as `recurchat train`
and reports val bpb at r̄ (r = 1 for a baseline); bpb at every evaluated r is kept on the trial. With `--data
probe:NAME:LO-HI` a trial trains that probe and reports 1 − its accuracy on the levels up to twice the trained ones
at 4r̄ (extrapolation by depth); accuracies at every evaluated r are kept. Each run saves a
checkpoint every ~10% of its steps. Optuna's heartbeat marks a trial whose worker died (SIGKILL, preemption) as
failed after `--grace-period` seconds and re-enqueues it; the retry resumes the run directory of the original trial
from its last checkpoint, so a killed sweep rerun with the same command loses at most ~10% of one trial and never
reruns a finished one. After each trial the worker rewrites DIR/summary.{md,json} and the plots (sweep/summary.py).
Exercised by `pytest tests/test_sweep.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import time
import warnings
from pathlib import Path

import optuna
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from recurchat.config import ModelConfig, TrainConfig
from recurchat.data.tasks.probes import is_probe
from recurchat.errors import UserError
from recurchat.files import atomic_write_text
from recurchat.model.recurrent import RecurrentLM
from recurchat.sweep.space import MODEL_KINDS, RECURSIVE, SweepSpec, parse_grid, parse_search, plan, swept_names
from recurchat.sweep.summary import write_summary
from recurchat.train.spec import pretrain_spec
from recurchat.train.telemetry import read_records
from recurchat.train.trainer import Diverged, train_or_resume

MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


@dataclasses.dataclass
class Worker:
    study_dir: Path
    study: optuna.Study
    spec: SweepSpec
    progress: bool = True


def open_study(study_dir: Path, storage: str | None, name: str, heartbeat: int, grace: int) -> optuna.Study:
    url = storage or f"sqlite:///{(study_dir / 'study.db').resolve()}"
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    rdb = optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=heartbeat, grace_period=grace,
                                     heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=rdb, study_name=name, direction="minimize", load_if_exists=True,
                               sampler=optuna.samplers.TPESampler())


@contextlib.contextmanager
def plan_lock(study_dir: Path):
    """Serialises creating the storage's tables and planning between workers that share DIR (workers on other
    machines: start one first)."""
    with open(study_dir / ".plan.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def agree_on_spec(study: optuna.Study, study_dir: Path, asked: SweepSpec | None) -> SweepSpec:
    """The study's plan: enqueued by the first worker; later workers must ask for the same one (or nothing).
    Call under plan_lock."""
    stored = study.user_attrs.get("spec")
    if stored is None:
        if asked is None:
            raise UserError(f"sweep: {study_dir} holds no study yet: give --preset and --max-steps")
        for params in plan(asked):
            study.enqueue_trial(params)
        study.set_user_attr("spec", asked.to_json())
        stored = asked.to_json()
    spec = SweepSpec.from_json(stored)
    if asked is not None and asked.to_json() != stored:
        raise UserError(f"sweep: {study_dir} holds a different sweep ({stored}); rerun it with the same arguments "
                        "or none, or choose a new --study")
    atomic_write_text(study_dir / "sweep.json", stored + "\n")
    return spec


def suggest_from(trial: optuna.Trial, name: str, dist: optuna.distributions.BaseDistribution):
    if isinstance(dist, optuna.distributions.FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    if isinstance(dist, optuna.distributions.IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log)
    return trial.suggest_categorical(name, dist.choices)


def frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def planned_params(trial: optuna.Trial) -> dict | None:
    """The params the plan enqueued for this trial, or None if it was not taken from the queue (another worker
    took the last waiting trial between our look and our ask)."""
    return frozen(trial).system_attrs.get("fixed_params")


def suggest(trial: optuna.Trial, spec: SweepSpec) -> tuple[str, dict]:
    """(model kind, config overrides) for this trial: grid values come fixed from the plan, search values from TPE."""
    kind = trial.suggest_categorical("model", MODEL_KINDS)
    swept = swept_names(spec, kind)
    overrides = {name: trial.suggest_categorical(name, values) for name, values in parse_grid(spec.grid).items()
                 if name in swept}
    for name, dist in parse_search(spec.search).items():
        overrides[name] = suggest_from(trial, name, dist)
    return kind, overrides


def eval_recur(model: ModelConfig) -> str:
    """r = 1, 2, r̄, 2r̄, 4r̄ (clamped to r_max): the depths the summary compares."""
    r = model.mean_recur
    return ",".join(str(x) for x in sorted({1, 2, r, 2 * r, 4 * r}))


def run_dir(worker: Worker, trial: optuna.Trial) -> Path:
    """The original trial's directory: a retry of a killed trial continues its checkpoint."""
    origin = RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen(trial))
    return worker.study_dir / "trials" / f"{trial.number if origin is None else origin:04d}"


def fresh_spec(worker: Worker, out: Path, kind: str, overrides: dict):
    spec = worker.spec
    model = {k: v for k, v in overrides.items() if k in MODEL_FIELDS}
    train = {k: v for k, v in overrides.items() if k in TRAIN_FIELDS}
    train.setdefault("max_steps", spec.max_steps)
    train.setdefault("eval_every", max(1, train["max_steps"] // 4))  # a learning curve at every depth costs time
    train.update(save_every=max(1, train["max_steps"] // 10), stop_after=0,
                 **({"data": spec.data} if spec.data else {}))
    run = pretrain_spec(spec.preset, out, standard="" if kind == RECURSIVE else kind, model=model, train=train,
                        overwrite=True)
    run.train = dataclasses.replace(run.train, eval_recur=eval_recur(run.model) if run.model.recursive else "")
    return run


def final_record(out: Path, key: str) -> dict[str, float]:
    """The last `key` record (val_bpb, val_acc, val_acc_long) the run logged: the end-of-run evaluation."""
    evals = [r[key] for r in read_records(out / "metrics.jsonl") if r.get(key)]
    if not evals:
        raise RuntimeError(f"{out} finished without a {key} record")
    return evals[-1]


def score(trial: optuna.Trial, out: Path, probe: bool) -> float:
    """Record the trial's figures; the objective is val bpb at r̄ (r = 1 for a baseline) on text, and on a probe
    1 − accuracy on the held-out longer levels at 4r̄ (r = 1 for a baseline): extrapolation by depth."""
    r = trial.user_attrs["mean_recur"]
    if not probe:
        bpb = final_record(out, "val_bpb")
        trial.set_user_attr("bpb", bpb)
        return bpb[str(r)]
    acc, longer = final_record(out, "val_acc"), final_record(out, "val_acc_long")
    trial.set_user_attr("acc", acc)
    trial.set_user_attr("acc_long", longer)
    return 1.0 - longer[str(4 * r if r > 1 else 1)]


def objective(worker: Worker, trial: optuna.Trial) -> float:
    if not planned_params(trial):
        raise optuna.TrialPruned("no planned trial was left to take")
    kind, overrides = suggest(trial, worker.spec)
    out = run_dir(worker, trial)
    trial.set_user_attr("run_dir", str(out.relative_to(worker.study_dir)))
    print(f"[sweep] trial {trial.number} → {out.name}: {kind} "
          + " ".join(f"{k}={v}" for k, v in overrides.items()), flush=True)
    fresh = fresh_spec(worker, out, kind, overrides)
    with torch.device("meta"):
        trial.set_user_attr("n_params", RecurrentLM(fresh.model).num_params()["total"])
    trial.set_user_attr("mean_recur", fresh.model.mean_recur if kind == RECURSIVE else 1)
    try:
        train_or_resume(out, lambda: fresh, progress=worker.progress)
    except Diverged as e:
        trial.set_user_attr("error", str(e))
        raise
    return score(trial, out, is_probe(fresh.train.data))


def counts(study: optuna.Study) -> dict[TrialState, int]:
    states: dict[TrialState, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state] = states.get(t.state, 0) + 1
    return states


def work(worker: Worker, poll_s: float = 2.0) -> None:
    """Run waiting trials until none is left; wait out running ones (a dead worker's trial is retried here)."""
    study = worker.study
    while True:
        fail_stale_trials(study)
        states = counts(study)
        if states.get(TrialState.WAITING):
            study.optimize(lambda t: objective(worker, t), n_trials=1, catch=(Diverged,))
            write_summary(worker.study_dir, study, worker.spec)
        elif states.get(TrialState.RUNNING):
            time.sleep(poll_s)
        else:
            break
    write_summary(worker.study_dir, study, worker.spec)


def sweep(study_dir: str | Path, asked: SweepSpec | None, storage: str | None = None, name: str = "recurchat",
          heartbeat: int = 10, grace: int = 60, progress: bool = True) -> Path:
    """Join (or create) the study in `study_dir` and work until its plan is done; returns summary.md's path."""
    study_dir = Path(study_dir)
    if asked is not None:
        asked.validate()
    if heartbeat < 1 or grace <= heartbeat:
        raise UserError("sweep: need --heartbeat >= 1 and --grace-period > --heartbeat")
    with warnings.catch_warnings():  # Optuna marks the heartbeat / retry API experimental; stable since 2.8
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study_dir.mkdir(parents=True, exist_ok=True)
        with plan_lock(study_dir):
            study = open_study(study_dir, storage, name, heartbeat, grace)
            spec = agree_on_spec(study, study_dir, asked)
        work(Worker(study_dir, study, spec, progress))
    return study_dir / "summary.md"

"""``kdforge sweep SWEEP.yaml``: a hyperparameter search over any recipe keys, on Optuna.

A sweep file names a base recipe, a search space over recipe keys, the objective, the
number of trials, a sampler and optional pruning (docs/sweep.md). Every trial is a normal
run directory (``<output_dir>/trial-<n>``). The study lives in Optuna's own storage: by
default a SQLite file beside the trials (``<output_dir>/study.db``), else a journal file
or any database URL, which is how several processes or machines share one sweep: each
runs ``kdforge sweep`` on the same file and storage. kdforge adds no coordination of its
own: trial numbers come from the storage, and a trial whose worker died is found by
Optuna's heartbeat and rerun with the same values (resuming from its last checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import RecipeError, TrainingStopped, did_you_mean

INSTALL = "pip install 'kdforge[sweep]'"
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "percentile", "successive_halving", "hyperband", "threshold", "patient", "wilcoxon")
SWEEP_KEYS = ("name", "recipe", "overrides", "space", "objective", "trials", "sampler", "pruner", "storage",
              "output_dir", "heartbeat")
COUNTED = "counted"  # a user attr: the trial took a place in the budget (see budget_trials)
TRIAL_DIR = "trial-{:03d}"


def optuna_module() -> Any:
    """``optuna``, or a one-line ``RecipeError`` naming the extra."""
    try:
        import optuna
    except ImportError:
        raise RecipeError(f"kdforge sweep runs on Optuna, which is not installed: {INSTALL}") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # kdforge prints its own line per trial
    return optuna


# -- the sweep file ----------------------------------------------------------------------------
@dataclass
class Param:
    """One dimension of the search space: a recipe key and the values it may take."""

    key: str
    kind: str  # float | int | choice
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list[Any] = field(default_factory=list)

    @property
    def structured(self) -> bool:
        """Whether the choices include lists or mappings (Optuna then sees them as JSON strings)."""
        return any(isinstance(c, (list, dict)) for c in self.choices)

    def encoded(self) -> list[Any]:
        """The choices as Optuna stores them."""
        return [json.dumps(c) for c in self.choices] if self.structured else list(self.choices)

    def decode(self, value: Any) -> Any:
        """A value as Optuna stored it, back as the recipe takes it."""
        return json.loads(value) if self.structured and isinstance(value, str) else value

    @property
    def label(self) -> str:
        """A short name for tables and plots: the key's last part (``temperature``), or the key when that is vague."""
        last = self.key.replace("]", "").replace("[", ".").split(".")[-1]
        return self.key if last in ("weight", "value", "params") or last.isdigit() else last

    def distribution(self) -> Any:
        """The Optuna distribution."""
        optuna = optuna_module()
        d = optuna.distributions
        if self.kind == "float":
            return d.FloatDistribution(float(self.low), float(self.high), log=self.log,
                                       step=None if self.step is None else float(self.step))
        if self.kind == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.CategoricalDistribution(self.encoded())

    def suggest(self, trial: Any) -> Any:
        """This dimension's value for an Optuna trial (``suggest_float``, ``suggest_int``, ``suggest_categorical``)."""
        if self.kind == "float":
            return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log,
                                       step=None if self.step is None else float(self.step))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return self.decode(trial.suggest_categorical(self.key, self.encoded()))

    def grid(self) -> list[Any] | None:
        """Every value, for the grid sampler (``None`` for a continuous range)."""
        if self.kind == "choice":
            return self.encoded()
        if self.kind == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.step is None:
            return None
        count = int(math.floor((float(self.high) - float(self.low)) / float(self.step) + 1e-9)) + 1
        return [round(float(self.low) + i * float(self.step), 12) for i in range(count)]

    def probe_values(self) -> list[Any]:
        """Values checked against the recipe before any trial: the ends of a range, every choice."""
        if self.kind == "choice":
            return list(self.choices)
        return [self.low, self.high] if self.low != self.high else [self.low]


def parse_param(key: str, spec: Any) -> Param:
    """``{float: [lo, hi], log: true}``, ``{int: [lo, hi], step: 2}`` or ``{choice: [a, b]}`` as a ``Param``."""
    where = f"space.{key}"
    if not isinstance(spec, dict):
        raise RecipeError("a search dimension is a mapping: {float: [lo, hi]}, {int: [lo, hi]} or {choice: [...]}",
                          key=where)
    kinds = [k for k in ("float", "int", "choice") if k in spec]
    unknown = sorted(set(map(str, spec)) - {"float", "int", "choice", "log", "step"})
    if unknown:
        raise RecipeError(f"unknown key {unknown[0]!r} (valid: float, int, choice, log, step)."
                          f"{did_you_mean(unknown[0], ['float', 'int', 'choice', 'log', 'step'])}", key=where)
    if len(kinds) != 1:
        raise RecipeError("give exactly one of float: [lo, hi], int: [lo, hi] or choice: [...]", key=where)
    kind = kinds[0]
    if kind == "choice":
        choices = spec["choice"]
        if not isinstance(choices, list) or not choices:
            raise RecipeError("choice takes a non-empty list of values", key=f"{where}.choice")
        bad = [c for c in choices if not (c is None or isinstance(c, (bool, int, float, str, list, dict)))]
        if bad:
            raise RecipeError(f"choices are numbers, strings, booleans, null, lists or mappings (got "
                              f"{type(bad[0]).__name__})", key=f"{where}.choice")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise RecipeError("choices repeat a value", key=f"{where}.choice")
        if "log" in spec or "step" in spec:
            raise RecipeError("log and step apply to float and int ranges, not to choice", key=where)
        return Param(key, "choice", choices=list(choices))
    bounds = spec[kind]
    number = (int,) if kind == "int" else (int, float)
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(b, number) and not isinstance(b, bool) for b in bounds)):
        raise RecipeError(f"{kind} takes [low, high] ({'integers' if kind == 'int' else 'numbers'})", key=f"{where}.{kind}")
    low, high = bounds
    if not all(math.isfinite(b) for b in bounds) or low > high:
        raise RecipeError(f"needs low <= high, both finite (got [{low}, {high}])", key=f"{where}.{kind}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise RecipeError("log is true or false", key=f"{where}.log")
    if log and low <= 0:
        raise RecipeError(f"a log scale needs low > 0 (got {low})", key=f"{where}.{kind}")
    step = spec.get("step")
    if step is not None:
        if not isinstance(step, number) or isinstance(step, bool) or not step > 0:
            raise RecipeError(f"step is a positive {'integer' if kind == 'int' else 'number'}", key=f"{where}.step")
        if log:
            raise RecipeError("a log scale takes no step (Optuna samples it continuously)", key=where)
    return Param(key, kind, low, high, log, step)


@dataclass
class Sweep:
    """A parsed sweep file."""

    name: str
    path: Path
    recipe: Path
    overrides: dict[str, Any]
    space: dict[str, Param]
    trials: int
    metric: str | None
    direction: str | None
    sampler: str
    seed: int | None
    sampler_params: dict[str, Any]
    pruner: str
    pruner_params: dict[str, Any]
    storage: str | None
    output_dir: Path
    heartbeat_interval: int
    grace_period: int
    max_retry: int
    raw_space: dict[str, Any]

    def trial_dir(self, number: int) -> Path:
        """The run directory of trial ``number``."""
        return self.output_dir / TRIAL_DIR.format(number)

    def storage_url(self) -> str:
        """Where the study lives: the given URL or file, else ``<output_dir>/study.db`` (SQLite)."""
        if self.storage in (None, "sqlite"):
            return f"sqlite:///{(self.output_dir / 'study.db').resolve()}"
        if self.storage == "journal":
            return str((self.output_dir / "study.journal").resolve())
        return self.storage


def load_sweep(path: str | os.PathLike[str], *, trials: int | None = None, storage: str | None = None) -> Sweep:
    """Read and check a sweep file (``RecipeError`` naming the key of a problem); paths as in docs/sweep.md."""
    from .recipe import load_yaml_file

    path = Path(path)
    try:
        data = load_yaml_file(path)
    except RecipeError as exc:
        raise RecipeError(str(exc).replace("recipe file", "sweep file")) from None
    unknown = sorted(set(map(str, data)) - set(SWEEP_KEYS))
    if unknown:
        raise RecipeError(f"unknown key {unknown[0]!r} in the sweep file (valid: {', '.join(SWEEP_KEYS)})."
                          f"{did_you_mean(unknown[0], SWEEP_KEYS)}", key=unknown[0])
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise RecipeError("is the sweep's name (a non-empty string without '/')", key="name")
    recipe = data.get("recipe")
    if not isinstance(recipe, str) or not recipe:
        raise RecipeError("is required: the base recipe's path (relative to the sweep file)", key="recipe")
    recipe_path = Path(recipe) if Path(recipe).is_absolute() else path.parent / recipe
    overrides = data.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise RecipeError("is a mapping of recipe keys to values, as --set takes them", key="overrides")
    space_spec = data.get("space")
    if not isinstance(space_spec, dict) or not space_spec:
        raise RecipeError("is required: a mapping of recipe keys to search dimensions", key="space")
    space = {str(k): parse_param(str(k), v) for k, v in space_spec.items()}
    clash = sorted(set(space) & set(map(str, overrides)))
    if clash:
        raise RecipeError("is both searched (space) and fixed (overrides)", key=f"space.{clash[0]}")
    n = trials if trials is not None else data.get("trials", 10)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise RecipeError("is the number of trials, at least 1", key="trials" if trials is None else "--trials")
    metric, direction = _objective(data.get("objective"))
    sampler, seed, sampler_params = _plugin(data.get("sampler", "tpe"), "sampler", SAMPLERS, allow_seed=True)
    pruner, _, pruner_params = _plugin(data.get("pruner", "none"), "pruner", PRUNERS, allow_seed=False)
    if sampler == "grid":
        continuous = [p.key for p in space.values() if p.grid() is None]
        if continuous:
            raise RecipeError("the grid sampler needs values to enumerate: give this float range a step, or use "
                              "choice", key=f"space.{continuous[0]}")
    store = storage if storage is not None else data.get("storage")
    if store is not None and not isinstance(store, str):
        raise RecipeError("is a database URL (sqlite:///..., postgresql://...), a journal file path, or "
                          "sqlite / journal for the default file beside the trials", key="storage")
    output_dir = data.get("output_dir", f"runs/{name}")
    if not isinstance(output_dir, str) or not output_dir:
        raise RecipeError("is the folder of the sweep's trials", key="output_dir")
    beat = data.get("heartbeat") or {}
    if not isinstance(beat, dict) or sorted(set(beat) - {"interval", "grace", "max_retry"}):
        raise RecipeError("takes interval and grace (seconds) and max_retry", key="heartbeat")
    interval, grace, retries = beat.get("interval", 10), beat.get("grace"), beat.get("max_retry", 2)
    grace = 3 * interval if grace is None else grace
    for key, value, least in (("interval", interval, 1), ("grace", grace, 1), ("max_retry", retries, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise RecipeError(f"is an integer of at least {least}", key=f"heartbeat.{key}")
    if grace <= interval:
        raise RecipeError(f"must be longer than the interval ({interval} s)", key="heartbeat.grace")
    if sampler == "grid":
        points = math.prod(len(p.grid() or []) for p in space.values())
        n = min(n, points)  # the grid's points, each once
    if sampler == "tpe":
        sampler_params.setdefault("n_startup_trials", max(2, min(10, n // 3)))
    return Sweep(name, path, recipe_path, {str(k): v for k, v in overrides.items()}, space, n, metric, direction,
                 sampler, seed, sampler_params, pruner, pruner_params, store, Path(output_dir), interval, grace, retries,
                 space_spec)


def _objective(spec: Any) -> tuple[str | None, str | None]:
    if spec is None:
        return None, None
    if isinstance(spec, str):
        spec = {"metric": spec}
    if not isinstance(spec, dict) or sorted(set(spec) - {"metric", "direction"}):
        raise RecipeError("is {metric: student/<metric>, direction: maximize|minimize} (both optional)", key="objective")
    metric, direction = spec.get("metric"), spec.get("direction")
    if metric is not None and (not isinstance(metric, str) or not metric):
        raise RecipeError("is a summary.json key, e.g. student/accuracy", key="objective.metric")
    if direction is not None and direction not in ("maximize", "minimize"):
        raise RecipeError(f"is maximize or minimize, not {direction!r}", key="objective.direction")
    return metric, direction


def _plugin(spec: Any, key: str, names: tuple[str, ...], *, allow_seed: bool) -> tuple[str, int | None, dict[str, Any]]:
    if isinstance(spec, str):
        spec = {"name": spec}
    valid = {"name", "params"} | ({"seed"} if allow_seed else set())
    if not isinstance(spec, dict) or sorted(set(spec) - valid):
        raise RecipeError(f"is a name ({', '.join(names)}) or {{{', '.join(sorted(valid))}}}", key=key)
    name = spec.get("name")
    if name not in names:
        raise RecipeError(f"unknown {key} {name!r} (valid: {', '.join(names)}).{did_you_mean(str(name), names)}",
                          key=f"{key}.name")
    seed = spec.get("seed", 0 if allow_seed else None)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RecipeError("is an integer (or null: a different search every time)", key=f"{key}.seed")
    params = spec.get("params") or {}
    if not isinstance(params, dict):
        raise RecipeError(f"are keyword arguments of Optuna's {key}", key=f"{key}.params")
    return name, seed, dict(params)


# -- checks before any trial -----------------------------------------------------------------
def check_sweep(sweep: Sweep, *, dry_run: bool = True) -> tuple[str, str]:
    """Validate the base recipe and every probe value of the space; return the objective ``(metric, direction)``.

    Each dimension's ends and choices (every grid point for the grid sampler) are validated
    statically, one at a time and all at their low and high ends together; then the base
    recipe (with the sweep's overrides) gets a dry run (data, models, one batch). Nothing
    is written.
    """
    from .runner import validate_recipe_source

    if not sweep.recipe.is_file():
        raise RecipeError(f"base recipe {str(sweep.recipe)!r} does not exist (paths are relative to the sweep file)",
                          key="recipe")
    lows = {p.key: p.probe_values()[0] for p in sweep.space.values()}
    highs = {p.key: p.probe_values()[-1] for p in sweep.space.values()}
    every = {p.key: (p.choices if p.kind == "choice" else p.grid()) if sweep.sampler == "grid" else p.probe_values()
             for p in sweep.space.values()}
    # one dimension at a time first, so that a failure names the dimension to blame; then all
    # at their low and at their high ends together (a failure there is the combination's: "space")
    probes = [{key: v} for key, values in every.items() for v in values] + [lows, highs]
    for probe in probes:
        try:
            validate_recipe_source(str(sweep.recipe), {**sweep.overrides, **probe})
        except RecipeError as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in probe.items())
            raise RecipeError(f"the space reaches a value the recipe refuses ({shown}): {exc}",
                              key=f"space.{next(iter(probe))}" if len(probe) == 1 else "space") from None
    try:
        recipe = validate_recipe_source(str(sweep.recipe), sweep.overrides, dry=dry_run)
    except RecipeError as exc:
        raise RecipeError(f"base recipe {str(sweep.recipe)!r} with the sweep's overrides: {exc}") from None
    return resolve_objective(sweep, recipe)


def resolve_objective(sweep: Sweep, recipe: Any) -> tuple[str, str]:
    """The sweep's metric and direction, defaulting to the task's headline (``student/<headline>``)."""
    headline, higher = task_headline(recipe)
    metric = sweep.metric or f"student/{headline}"
    if sweep.direction is not None:
        return metric, sweep.direction
    if metric.partition("/")[2] == headline:
        return metric, "maximize" if higher else "minimize"
    raise RecipeError(f"objective.direction is needed: {metric!r} is not the task's headline ({headline})",
                      key="objective.direction")


def task_headline(recipe: Any) -> tuple[str, bool]:
    """The headline metric of a recipe's task and whether higher is better (the dataset may name the task)."""
    from .build import build_data, build_task, private_rng

    splits = None
    if recipe.task is None:
        with private_rng(recipe.seed):
            splits = build_data(recipe)
    task, _, _ = build_task(recipe, splits)
    return task.headline, bool(task.higher_is_better)


def fingerprint(sweep: Sweep) -> dict[str, str]:
    """What must not change while a study runs: the space, the objective and the base recipe (with overrides)."""
    from .recipe import load_recipe

    recipe = load_recipe(str(sweep.recipe), sweep.overrides).model_dump(mode="json")
    recipe.pop("output_dir", None)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {"kdforge.space": json.dumps(sweep.raw_space, sort_keys=True, default=str), "kdforge.recipe": digest}


# -- the study ---------------------------------------------------------------------------------
class PerTrialSeed:
    """A sampler rebuilt for each trial with seed ``seed + trial number``.

    One process gives the same search every time, processes that share a study (and a
    sweep resumed after a kill) do not propose each other's values again, since no sampler
    state lives in a process: the study is the only memory.
    """

    def __init__(self, build: Callable[[int | None], Any], seed: int | None) -> None:
        self._build, self._seed = build, seed
        self._number: int | None = None
        self._current = build(seed)

    def _for(self, trial: Any) -> Any:
        if trial.number != self._number:
            self._number = trial.number
            self._current = self._build(None if self._seed is None else self._seed + trial.number)
        return self._current

    def infer_relative_search_space(self, study: Any, trial: Any) -> Any:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: Any) -> Any:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, name: str, distribution: Any) -> Any:
        return self._for(trial).sample_independent(study, trial, name, distribution)

    def before_trial(self, study: Any, trial: Any) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self._for(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._current.reseed_rng()


def make_sampler(sweep: Sweep) -> Any:
    """The sweep's sampler (random and TPE seeded per trial; the grid's own order), with its params checked."""
    optuna = optuna_module()
    samplers = optuna.samplers
    params = dict(sweep.sampler_params)
    if sweep.sampler == "grid":
        # one shuffle of the grid for every process: trial n takes point n of it, so processes never collide
        grid = {p.key: p.grid() for p in sweep.space.values()}
        try:
            return samplers.GridSampler(grid, seed=sweep.seed, **params)
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"Optuna's grid sampler refuses these params: {exc}", key="sampler.params") from None
    if sweep.sampler == "random":
        build = lambda seed: samplers.RandomSampler(seed=seed, **params)  # noqa: E731
    else:
        build = lambda seed: samplers.TPESampler(seed=seed, **params)  # noqa: E731
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            build(0)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"Optuna's {sweep.sampler} sampler refuses these params: {exc}", key="sampler.params") from None

    class Sampler(PerTrialSeed, samplers.BaseSampler):
        pass

    return Sampler(build, sweep.seed)


def make_pruner(sweep: Sweep) -> Any:
    """The sweep's pruner (``NopPruner`` for none), with its params checked."""
    pruners = optuna_module().pruners
    classes = {"none": pruners.NopPruner, "median": pruners.MedianPruner, "percentile": pruners.PercentilePruner,
               "successive_halving": pruners.SuccessiveHalvingPruner, "hyperband": pruners.HyperbandPruner,
               "threshold": pruners.ThresholdPruner, "patient": pruners.PatientPruner,
               "wilcoxon": pruners.WilcoxonPruner}
    params = dict(sweep.pruner_params)
    if sweep.pruner == "patient":
        params.setdefault("wrapped_pruner", None)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return classes[sweep.pruner](**params)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"Optuna's {sweep.pruner} pruner refuses these params: {exc}", key="pruner.params") from None


def make_storage(sweep: Sweep) -> Any:
    """Optuna's storage: RDB (SQLite by default, with a heartbeat) or a journal file (no heartbeat)."""
    optuna = optuna_module()
    url = sweep.storage_url()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the heartbeat and journal classes are "experimental" in Optuna
        if "://" not in url:
            from optuna.storages.journal import JournalFileBackend, JournalStorage

            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(url))
        if url.startswith("sqlite:///"):
            Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=sweep.max_retry,
                                                                 inherit_intermediate_values=True)
        engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
        for attempt in range(8):  # two workers creating the same new database at once race on its tables
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=sweep.heartbeat_interval,
                                                  grace_period=sweep.grace_period, heartbeat_stale_trial_callback=retry)
            except Exception as exc:  # noqa: BLE001 - sqlalchemy's OperationalError and friends
                racing = any(m in str(exc) for m in ("already exists", "locked", "UNIQUE constraint"))
                if attempt == 7 or not racing:
                    raise RecipeError(f"cannot open the sweep's storage {url!r}: {type(exc).__name__}: "
                                      f"{' '.join(str(exc).split())[:300]}", key="storage") from None
                time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(sweep: Sweep, direction: str, metric: str, *, create: bool = True) -> Any:
    """Create or load the sweep's study and check it is this sweep's (same space, objective and base recipe)."""
    optuna = optuna_module()
    storage = make_storage(sweep)
    if not create:
        try:
            study = optuna.load_study(study_name=sweep.name, storage=storage, sampler=make_sampler(sweep),
                                      pruner=make_pruner(sweep))
        except KeyError:
            raise RecipeError(f"no study {sweep.name!r} in {sweep.storage_url()!r} yet: run the sweep first") from None
    else:
        study = optuna.create_study(study_name=sweep.name, storage=storage, sampler=make_sampler(sweep),
                                    pruner=make_pruner(sweep), direction=direction, load_if_exists=True)
    marks = {**fingerprint(sweep), "kdforge.metric": metric}
    stored = study.user_attrs
    # Only a mark that is there and differs is a conflict: a worker that started at the same
    # moment may still be writing them one by one, and every worker writes the same values.
    changed = [k[len("kdforge."):] for k, v in marks.items() if k in stored and stored[k] != v]
    if changed:
        raise RecipeError(f"the study {sweep.name!r} in {sweep.storage_url()!r} was started with another "
                          f"{' and '.join(changed)}; give this sweep another name or output_dir, or restore it")
    for key, value in marks.items():
        if key not in stored:
            study.set_user_attr(key, value)
    if study.direction.name.lower() != direction:
        raise RecipeError(f"the study {sweep.name!r} {study.direction.name.lower()}s; this sweep would {direction}",
                          key="objective.direction")
    return study


# -- trials ------------------------------------------------------------------------------------
class TrialError(Exception):
    """A trial failed (its run raised, or gave no objective value): recorded as FAIL, the sweep goes on."""


class Surplus(Exception):
    """This worker asked for a trial after the budget was full (another worker was quicker)."""


def counts_in_budget(trial: Any, superseded: set[int]) -> bool:
    """Whether a trial takes one of the sweep's ``trials`` places.

    Every trial counts (complete, pruned, failed, running, waiting) except one that was
    rerun (interrupted, or found dead by the heartbeat: its rerun counts instead) and a
    surplus trial that a worker opened just after the budget filled and closed at once.
    """
    state = trial.state.name
    if state == "FAIL" and (trial.number in superseded or trial.user_attrs.get("surplus")):
        return False
    return True


def budget_trials(trials: list[Any]) -> list[Any]:
    """The trials that take places in the budget (see ``counts_in_budget``)."""
    superseded = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if counts_in_budget(t, superseded)]


class Pruning:
    """A run callback: reports the objective after every epoch to the trial; raises ``TrialPruned`` when told."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def on_epoch_end(self, run: Any) -> None:
        """Report ``run.metrics[metric]`` at step = epoch; prune if the pruner says so."""
        value = (run.metrics or {}).get(self.metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return
        epoch = int((run.metrics or {}).get("epoch", run.epoch + 1))
        self.trial.report(float(value), step=epoch)
        if self.trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"after epoch {epoch}: {self.metric} {value:.4g}")


@dataclass
class Worker:
    """One process's part in a sweep: asks the study for trials and runs them until the budget is full."""

    sweep: Sweep
    study: Any
    metric: str
    direction: str
    out: Callable[[str], None] = print

    def frozen(self, number: int) -> Any:
        return next(t for t in self.study.get_trials(deepcopy=False) if t.number == number)

    def objective(self, trial: Any) -> float:
        """Run one trial as a kdforge run; its value is the summary's objective metric."""
        import kdforge
        import optuna

        from . import checkpoint as ckpt

        if self.surplus(trial.number):
            trial.set_user_attr("surplus", True)
            raise Surplus("the sweep's trials were all taken")
        params = {key: param.suggest(trial) for key, param in self.sweep.space.items()}
        system = self.frozen(trial.number).system_attrs
        root = system.get("failed_trial", trial.number)
        run_dir = self.sweep.trial_dir(root)
        resume = root != trial.number and ckpt.latest_checkpoint(run_dir) is not None
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("resumed", resume)
        started = time.perf_counter()
        overrides = {**self.sweep.overrides, **params, "trainer.progress_bar": False}
        try:
            summary = kdforge.run(str(self.sweep.recipe), overrides, output_dir=run_dir, resume=resume,
                                  overwrite=not resume, callbacks=[Pruning(trial, self.metric)])
        except optuna.TrialPruned:
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
            raise
        except KeyboardInterrupt:
            self.retry_later(trial)
            raise
        except TrainingStopped as exc:
            if exc.exit_code == 130:  # Ctrl-C or SIGTERM: the run saved a checkpoint; rerun it later
                self.retry_later(trial)
                raise KeyboardInterrupt(str(exc)) from None
            trial.set_user_attr("error", str(exc))
            raise TrialError(str(exc)) from None
        except RecipeError as exc:
            trial.set_user_attr("error", f"recipe error: {exc}")
            raise TrialError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the sweep goes on; the trial records why it failed
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
            raise TrialError(str(exc)) from exc
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
        value = summary.get(self.metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            trial.set_user_attr("error", f"the run's summary has no finite {self.metric!r} ({value!r})")
            raise TrialError(f"no finite {self.metric!r} in the run's summary")
        return float(value)

    def surplus(self, number: int) -> bool:
        """Whether the budget was already full when this trial was opened (lower trial numbers hold it)."""
        ahead = [t for t in budget_trials(self.study.get_trials(deepcopy=False)) if t.number < number]
        return len(ahead) >= self.sweep.trials

    def retry_later(self, trial: Any) -> None:
        """Queue the same values again (the rerun resumes from the trial's checkpoint)."""
        import optuna

        trial.set_user_attr("interrupted", True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=self.sweep.max_retry,
                                                             inherit_intermediate_values=True)(
                self.study, self.frozen(trial.number))

    def announce(self, _study: Any, trial: Any) -> None:
        """One line per finished trial."""
        if trial.user_attrs.get("surplus"):
            return
        values = ", ".join(f"{self.sweep.space[k].label}={format_value(self.sweep.space[k].decode(v))}"
                           for k, v in trial.params.items() if k in self.sweep.space)
        seconds = trial.user_attrs.get("seconds")
        took = f" ({seconds:.1f} s)" if isinstance(seconds, (int, float)) else ""
        if trial.state.name == "COMPLETE":
            text = f"{self.metric} {trial.value:.4g}"
        elif trial.state.name == "PRUNED":
            last = max(trial.intermediate_values) if trial.intermediate_values else None
            text = f"pruned after epoch {last}" if last is not None else "pruned"
        elif trial.user_attrs.get("interrupted"):
            text = "interrupted; it reruns when the sweep does"
        else:
            text = f"failed: {trial.user_attrs.get('error', 'see its run directory')}"
        self.out(f"sweep {self.sweep.name}: trial {trial.number} [{values}]: {text}{took}")

    def run(self, retry_running: bool = False) -> None:
        """Run trials until the budget is full and no trial of this study is left running anywhere."""
        import optuna

        heartbeat = "://" in self.sweep.storage_url()  # RDB storages get a heartbeat (make_storage); journals have none
        if retry_running:
            self.fail_running()
        noted = False
        while True:
            if heartbeat:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    optuna.storages.fail_stale_trials(self.study)
            trials = self.study.get_trials(deepcopy=False)
            counted = budget_trials(trials)
            if len(counted) < self.sweep.trials or any(t.state.name == "WAITING" for t in counted):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.study.optimize(self.objective, n_trials=1, catch=(TrialError, Surplus),
                                        callbacks=[self.announce], gc_after_trial=True)
                continue
            running = [t.number for t in trials if t.state.name == "RUNNING"]
            if not running:
                return
            if not heartbeat:
                self.out(f"sweep {self.sweep.name}: trial(s) {', '.join(map(str, running))} still running elsewhere "
                         f"(a journal storage has no heartbeat: if their worker died, rerun with --retry-running)")
                return
            if not noted:
                self.out(f"sweep {self.sweep.name}: waiting for trial(s) {', '.join(map(str, running))} (running "
                         f"elsewhere, or rerun after {self.sweep.grace_period} s without a heartbeat)")
                noted = True
            time.sleep(self.sweep.heartbeat_interval)

    def fail_running(self) -> None:
        """``--retry-running``: every trial marked running is taken as dead, failed, and queued again."""
        import optuna

        for trial in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            self.study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=self.sweep.max_retry,
                                                                 inherit_intermediate_values=True)(
                    self.study, self.frozen(trial.number))
            self.out(f"sweep {self.sweep.name}: trial {trial.number} was marked running; queued again (--retry-running)")


def format_value(value: Any) -> str:
    """A parameter value for tables: four significant digits for floats."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# -- results -----------------------------------------------------------------------------------
def trial_records(study: Any, sweep: Sweep) -> list[dict[str, Any]]:
    """Every trial that counts, as data (surplus and superseded trials left out, reruns marked)."""
    trials = study.get_trials(deepcopy=False)
    records = []
    for t in budget_trials(trials):
        records.append({
            "number": t.number, "state": t.state.name.lower(), "value": t.value,
            "params": {k: sweep.space[k].decode(v) if k in sweep.space else v for k, v in t.params.items()},
            "run_dir": t.user_attrs.get("run_dir"), "seconds": t.user_attrs.get("seconds"),
            "rerun_of": t.system_attrs.get("failed_trial"), "resumed": t.user_attrs.get("resumed", False),
            "error": t.user_attrs.get("error"),
            "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
        })
    return records


def best_records(records: list[dict[str, Any]], direction: str, top: int = 5) -> list[dict[str, Any]]:
    """The ``top`` complete trials, best first."""
    done = [r for r in records if r["state"] == "complete" and r["value"] is not None]
    return sorted(done, key=lambda r: r["value"], reverse=direction == "maximize")[:top]


def best_table(sweep: Sweep, records: list[dict[str, Any]], metric: str, direction: str, top: int = 5) -> str:
    """The best trials as a text table."""
    from .cli import format_table

    best = best_records(records, direction, top)
    percent = "accuracy" in metric
    headers = ["rank", "trial"] + [p.label for p in sweep.space.values()] + [metric, "seconds", "run directory"]
    rows = []
    for rank, r in enumerate(best, 1):
        value = f"{100 * r['value']:.2f}%" if percent else f"{r['value']:.4g}"
        rows.append([rank, r["number"], *[format_value(r["params"].get(k)) for k in sweep.space], value,
                     f"{r['seconds']:.1f}" if isinstance(r["seconds"], (int, float)) else "-", r["run_dir"]])
    return format_table(headers, rows)


def state_counts(records: list[dict[str, Any]]) -> str:
    """``"8 trials: 7 complete, 1 pruned"``."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    parts = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    return f"{len(records)} trial(s): {parts}" if records else "no trials yet"


def finish(sweep: Sweep, study: Any, metric: str, direction: str, out: Callable[[str], None],
           report: bool = True) -> Path | None:
    """Print the best trials and write the sweep's report; return the report folder (``None`` without one)."""
    from .report_sweep import write_sweep_report

    records = trial_records(study, sweep)
    out(f"\nsweep {sweep.name}: {state_counts(records)} ({direction} {metric}; study in {sweep.storage_url()})")
    if best_records(records, direction):
        out(best_table(sweep, records, metric, direction))
    if not report:
        return None
    try:
        folder = write_sweep_report(sweep, records, metric, direction)
    except RecipeError as exc:  # matplotlib missing: the table above is the result
        out(f"kdforge: note: no sweep report: {exc}")
        return None
    out(f"report: {folder / 'index.html'}")
    return folder


# -- the command ----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``kdforge sweep``."""
    parser.add_argument("sweep_file", metavar="SWEEP.yaml", help="the sweep file (docs/sweep.md)")
    parser.add_argument("--trials", type=int, default=None,
                        help="total trials of the study (default: the file's trials); a larger number extends a sweep")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="Optuna storage shared by the workers: a database URL, a journal file, or sqlite/journal "
                             "for the default file in the sweep's output_dir (default: the file's storage, else sqlite)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes on this machine (default 1); more machines: run the same command there "
                             "with a shared --storage")
    parser.add_argument("--retry-running", action="store_true",
                        help="take every trial still marked running as dead (after a crash, when no other worker is "
                             "running): fail it and rerun its values")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="print the best trials at the end but write no report folder")
    parser.add_argument("--report-only", action="store_true",
                        help="run no trial: print the best trials and write the report of the study so far")


def run(args: argparse.Namespace) -> int:
    """``kdforge sweep``: check everything, run this process's trials (and workers'), then report."""
    from .cli import emit

    optuna_module()
    if args.workers < 1:
        raise RecipeError("--workers must be at least 1")
    sweep = load_sweep(args.sweep_file, trials=args.trials, storage=args.storage)
    if args.report_only:
        metric, direction = check_sweep(sweep, dry_run=False)
        study = open_study(sweep, direction, metric, create=False)
        finish(sweep, study, metric, direction, emit)
        return 0
    metric, direction = check_sweep(sweep)
    study = open_study(sweep, direction, metric)
    emit(f"sweep {sweep.name}: {sweep.trials} trial(s) of {sweep.recipe} over {', '.join(sweep.space)}; "
         f"{direction} {metric}; {sweep.sampler} sampler, {sweep.pruner} pruner; study in {sweep.storage_url()}")
    workers = spawn_workers(args, args.workers - 1)
    try:
        with per_worker_threads(args.workers):
            Worker(sweep, study, metric, direction, emit).run(retry_running=args.retry_running)
    except KeyboardInterrupt:
        for process in workers:
            process.join(timeout=60)
        emit(f"sweep {sweep.name}: interrupted; rerun the same command to continue (the interrupted trial reruns "
             f"from its checkpoint)")
        return 130
    for process in workers:
        process.join()
    failed = [p.exitcode for p in workers if p.exitcode != 0]
    finish(sweep, study, metric, direction, emit, report=args.report)
    if failed:
        print(f"kdforge: {len(failed)} worker process(es) ended with an error (exit codes {failed})", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def per_worker_threads(workers: int) -> Iterator[None]:
    """Split the machine's cores between this machine's worker processes (torch threads), restored after."""
    import torch

    before = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def spawn_workers(args: argparse.Namespace, count: int) -> list[Any]:
    """Start ``count`` more worker processes on this machine (after the study exists: no creation race)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes = []
    for _ in range(count):
        process = context.Process(target=_worker_main, args=(args.sweep_file, args.trials, args.storage, args.workers),
                                  daemon=False)
        process.start()
        processes.append(process)
    return processes


def _worker_main(sweep_file: str, trials: int | None, storage: str | None, workers: int) -> None:
    """A spawned worker: the same checks (static), then trials; prints its own trial lines."""
    try:
        sweep = load_sweep(sweep_file, trials=trials, storage=storage)
        metric, direction = check_sweep(sweep, dry_run=False)
        study = open_study(sweep, direction, metric)
        with per_worker_threads(workers):
            Worker(sweep, study, metric, direction, lambda text: print(text, flush=True)).run()
    except KeyboardInterrupt:
        sys.exit(130)
    except RecipeError as exc:
        print(f"kdforge: error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    """``python -m kdforge.sweep SWEEP.yaml ...``: the command without the kdforge CLI (errors as the CLI shows them)."""
    parser = argparse.ArgumentParser(prog="kdforge sweep")
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except RecipeError as exc:
        print(f"kdforge: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

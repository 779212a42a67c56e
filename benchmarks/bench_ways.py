"""The ways one workload runs, each timed the same way: samples per second after a warm-up.

* ``hand-written``: the loop a user would write (teacher forward under ``no_grad``, student
  forward, 0.1 CE + 0.9 T^2 KL(T=4), backward, optimizer step), on kdforge's models, data
  and batch order.
* ``kdforge-online``: ``kdforge.run`` of the workload's recipe, end to end; throughput from
  its own ``train/samples_per_second`` records in ``metrics.jsonl``.
* ``kdforge-cached``: the same recipe with ``teacher.cache``; the build run and the reuse
  runs are reported apart.
* ``torchdistill``: torchdistill's ``DistillationBox`` (its ``KDLoss``, its optimizer and
  data-loader builders) on the same models, data and batch order.
* ``student-only``: ``kdforge.run`` of the student with CE alone (no teacher): the floor a
  cached KD epoch is held against.

Every run is timed from the end of its warm-up steps to its last step; what happens between
epochs (kdforge's evaluation and checkpoint) is not timed in any way. A round of a way is a
fresh run from the initial weights, so every round of every way does the same work.

Two clocks: wall time (kdforge's own ``train/samples_per_second`` for the kdforge ways) and
this process's CPU time over the same spans (a kdforge callback for the kdforge ways). CPU
time is what other processes on a busy machine disturb least (with one thread).
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from bench_workloads import BATCH_SIZE, CE_WEIGHT, KD_WEIGHT, TEMPERATURE, Reference, Workload

FIRST_LOSSES = 3  # losses of the first steps kept from the warm-up round
#: the warm-up round reseeds torch's RNG before the first step and after each step, the same in
#: every way: the students' dropout (MobileNetV2's classifier) then draws the same masks, so the
#: first losses agree exactly. Timed rounds do not reseed.
RESEED = 1234


@dataclass
class RoundResult:
    """One run of one way: the timed samples and seconds, and what else it reported."""

    samples: int
    seconds: float  # wall
    cpu_seconds: float | None = None  # this process's CPU time over the same steps
    first_losses: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds

    @property
    def cpu_samples_per_second(self) -> float | None:
        return self.samples / self.cpu_seconds if self.cpu_seconds else None


class Spans:
    """Wall and CPU time summed over spans: ``start()`` then ``stop()``, as often as needed."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self._started: tuple[float, float] | None = None

    def start(self) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        if self._started is not None:
            self.wall += time.perf_counter() - self._started[0]
            self.cpu += time.process_time() - self._started[1]
            self._started = None


class Unavailable(Exception):
    """This way cannot run here (a package or a kdforge feature is missing); the message says why."""


# -- the loops outside kdforge ---------------------------------------------------------------
def masked_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labeled samples (-1 = unlabeled, as in the digits demo); 0 without labels."""
    labeled = (targets >= 0).float()
    per_sample = F.cross_entropy(logits, targets.clamp_min(0), reduction="none")
    return (per_sample * labeled).sum() / labeled.sum().clamp_min(1.0)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0.1 CE + 0.9 T^2 KL(softmax(t/T) || softmax(s/T)), batch mean, T = 4."""
    kl = F.kl_div(F.log_softmax(student_logits / TEMPERATURE, dim=-1), F.log_softmax(teacher_logits / TEMPERATURE, dim=-1),
                  reduction="batchmean", log_target=True)
    return CE_WEIGHT * masked_ce(student_logits, targets) + KD_WEIGHT * TEMPERATURE**2 * kl


def timed_epochs(workload: Workload, epoch_batches: Callable[[int], Any], step: Callable[..., torch.Tensor],
                 keep_losses: int) -> RoundResult:
    """Run every epoch, timing from the end of the warm-up steps to the end of each epoch.

    ``epoch_batches(epoch)`` gives the epoch's batches (its iterator is made inside the
    timed span, as kdforge's is); ``step(batch)`` does one optimizer step and returns the loss.
    With ``keep_losses`` (the warm-up round) the RNG is reseeded as ``Reseed`` does in kdforge.
    """
    done, samples, losses, spans = 0, 0, [], Spans()
    if keep_losses:
        torch.manual_seed(RESEED)
    for epoch in range(workload.epochs):
        if done >= workload.warmup_steps:
            spans.start()
        for batch in epoch_batches(epoch):
            loss = step(batch)
            done += 1
            if keep_losses:
                torch.manual_seed(RESEED + done)
            if len(losses) < keep_losses:
                losses.append(loss.detach())
            if done > workload.warmup_steps:
                samples += int(batch[0].shape[0])
            elif done == workload.warmup_steps:
                spans.start()
        spans.stop()
    return RoundResult(samples, spans.wall, spans.cpu, [float(v) for v in losses])


def hand_written(ref: Reference, keep_losses: int) -> RoundResult:
    """The minimal PyTorch KD loop on kdforge's models, data and batch order."""
    student, teacher = ref.fresh_student(), ref.teacher
    optimizer = ref.optimizer(student)
    loader = DataLoader(ref.dataset, batch_size=BATCH_SIZE, sampler=ref.sampler())

    def step(batch: Any) -> torch.Tensor:
        x, y = batch
        with torch.no_grad():
            t = teacher(x)
        loss = kd_loss(student(x), t, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return timed_epochs(ref.workload, lambda _epoch: loader, step, keep_losses)


# -- torchdistill ------------------------------------------------------------------------------
def torchdistill_version() -> str | None:
    try:
        import torchdistill
    except ImportError:
        return None
    return getattr(torchdistill, "__version__", "unknown")


def torchdistill_config(ref: Reference) -> dict[str, Any]:
    """torchdistill's ``train`` config for the workload: its KDLoss, its SGD/AdamW, its loader builder."""
    spec = ref.workload.recipe["optimizer"]
    optimizer = {"key": {"sgd": "SGD", "adamw": "AdamW"}[spec["name"]], "kwargs": dict(spec["params"])}
    kd = {"student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
          "teacher_module_io": "output", "temperature": TEMPERATURE, "alpha": CE_WEIGHT, "beta": KD_WEIGHT,
          "reduction": "batchmean",
          # passed on to its CrossEntropyLoss: the digits demo marks unlabeled samples -1
          "ignore_index": -1}
    return {
        "num_epochs": ref.workload.epochs,
        "train_data_loader": {
            "dataset_id": "train",
            # kdforge's batch order, so the first step is the same step
            "sampler": {"class_or_func": lambda _dataset: ref.sampler(), "kwargs": {}},
            "kwargs": {"batch_size": BATCH_SIZE, "num_workers": 0, "drop_last": False},
            "requires_supp": True,
        },
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "frozen_modules": [],
                    "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "sequential": [], "frozen_modules": [],
                    "requires_grad": True},
        "optimizer": optimizer,
        "criterion": {"key": "WeightedSumLoss",
                      "kwargs": {"sub_terms": {"kd": {"criterion": {"key": "KDLoss", "kwargs": kd}, "weight": 1.0}}}},
    }


def write_torchdistill_config(config: dict[str, Any], path: Path) -> None:
    """The config as YAML, for the record (the sampler is a Python object: written as its description)."""
    import yaml

    shown = json.loads(json.dumps(config, default=lambda _obj: "<kdforge's batch order (bench_workloads.EpochOrders)>"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"train": shown}, sort_keys=False))


def torchdistill_way(ref: Reference, keep_losses: int, config_path: Path | None = None) -> RoundResult:
    """torchdistill 1.1.5's ``DistillationBox`` driven as its image-classification example drives it."""
    if torchdistill_version() is None:
        raise Unavailable("torchdistill is not installed (pip install torchdistill==1.1.5, or the `bench` extra)")
    from torchdistill.core.distillation import get_distillation_box

    config = torchdistill_config(ref)
    if config_path is not None:
        write_torchdistill_config(config, config_path)
    student = ref.fresh_student()
    box = get_distillation_box(ref.teacher, student, {"train": ref.dataset}, config, torch.device("cpu"),
                               None, False, 1)

    def epoch_batches(epoch: int) -> Any:
        box.pre_epoch_process(epoch=epoch)
        return box.train_data_loader

    def step(batch: Any) -> torch.Tensor:
        x, y, supp = batch
        loss = box.forward_process(x, y, supp)
        box.post_forward_process(loss=loss)
        return loss

    try:
        return timed_epochs(ref.workload, epoch_batches, step, keep_losses)
    finally:
        box.clean_modules()
        ref.teacher.requires_grad_(False)  # clean_modules unfreezes the (shared) teacher


# -- kdforge -----------------------------------------------------------------------------------
def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The training records of a run's metrics.jsonl, in step order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return sorted((r for r in records if "train/samples_per_second" in r), key=lambda r: r["step"])


def kdforge_throughput(workload: Workload, records: list[dict[str, Any]]) -> tuple[int, float]:
    """Samples and seconds of the records after the warm-up steps.

    Each record's ``train/samples_per_second`` covers the steps since the record before it;
    its seconds are that interval's samples over it.
    """
    sizes = workload.batch_sizes()
    samples, seconds, before = 0, 0.0, 0
    for record in records:
        step = int(record["step"])
        interval = sum(sizes[before:step])
        if before >= workload.warmup_steps:
            samples += interval
            seconds += interval / record["train/samples_per_second"]
        before = step
    if before != len(sizes) or samples != workload.timed_samples:
        raise SystemExit(f"bench: kdforge's records of {workload.name} cover {before} steps and {samples} timed "
                         f"samples, expected {len(sizes)} and {workload.timed_samples} (log_every changed?)")
    return samples, seconds


class StepClock:
    """A kdforge callback timing the same spans as ``timed_epochs``: after the warm-up steps, per epoch.

    A span starts when step ``warmup_steps`` ends, or when an epoch has ended (after kdforge's
    evaluation), and stops at the end of each epoch's last step.
    """

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.spans = Spans()

    def on_step_end(self, run: Any) -> None:
        step, w = run.step, self.workload
        if step % w.steps_per_epoch == 0 and step > w.warmup_steps:
            self.spans.stop()
        if step == w.warmup_steps:
            self.spans.start()

    def on_epoch_end(self, run: Any) -> None:
        if run.step >= self.workload.warmup_steps and run.step < self.workload.epochs * self.workload.steps_per_epoch:
            self.spans.start()


class Reseed:
    """A kdforge callback for the warm-up round: torch's RNG seeded as ``timed_epochs`` seeds it."""

    def on_fit_start(self, run: Any) -> None:
        torch.manual_seed(RESEED)

    def on_step_end(self, run: Any) -> None:
        torch.manual_seed(RESEED + run.step)


def run_kdforge(recipe: dict[str, Any], run_dir: Path, clock: StepClock, reseed: bool) -> tuple[dict[str, Any], bool]:
    """``kdforge.run`` with the clock (and in the warm-up round ``Reseed``) as callbacks, where this kdforge takes them."""
    import kdforge

    try:
        callbacks = [clock, Reseed()] if reseed else [clock]
        return kdforge.run(recipe, output_dir=run_dir, overwrite=True, callbacks=callbacks), True
    except TypeError as exc:
        if "callbacks" not in str(exc):
            raise
    return kdforge.run(recipe, output_dir=run_dir, overwrite=True), False


def kdforge_way(recipe: dict[str, Any], workload: Workload, run_dir: Path, keep_losses: int) -> RoundResult:
    """``kdforge.run`` end to end; throughput from its own records, after the warm-up interval."""
    started = time.perf_counter()
    clock = StepClock(workload)
    summary, clocked = run_kdforge(recipe, run_dir, clock, reseed=keep_losses > 0)
    wall = time.perf_counter() - started
    records = read_metrics(run_dir)
    samples, seconds = kdforge_throughput(workload, records)
    losses = [r["train/loss"] for r in records[:keep_losses]] if recipe["trainer"]["log_every"] == 1 else []
    info: dict[str, Any] = {"run_seconds": round(wall, 3)}
    if clocked:  # the callback's wall time over the same spans, which also counts the writing of records
        info["callback_wall_seconds"] = round(clock.spans.wall, 6)
    if "teacher/cache" in summary:
        info["cache"] = summary["teacher/cache"]
    return RoundResult(samples, seconds, clock.spans.cpu if clocked else None, losses, info)


def cache_support(workload: Workload, cache_dir: Path) -> str | None:
    """``None`` when this kdforge validates a recipe with ``teacher.cache``; else why not."""
    import kdforge
    from kdforge import RecipeError

    try:
        kdforge.validate(workload.cached_recipe(cache_dir / "probe", 1, cache_dir))
    except RecipeError as exc:
        if (exc.key or "").startswith("teacher.cache") and "unknown key" in str(exc):
            return "cache not available in this kdforge (`teacher.cache` is not a recipe key yet)"
        return f"cache not available: kdforge validate refuses the cached recipe: {exc}"
    return None


class KdforgeWays:
    """The three kdforge ways of one workload, with their run folders and the cache's."""

    def __init__(self, workload: Workload, workdir: Path) -> None:
        self.workload = workload
        self.workdir = workdir / workload.name
        self.cache_dir = self.workdir / "teacher-cache"
        self.cache_problem = cache_support(workload, self.cache_dir)

    def log_every(self, warmup_round: bool) -> int:
        # the warm-up round logs every step: its records give the first steps' losses
        return 1 if warmup_round else self.workload.warmup_steps

    def online(self, warmup_round: bool) -> RoundResult:
        run_dir = self.workdir / "kdforge-online"
        recipe = self.workload.kd_recipe(run_dir, self.log_every(warmup_round))
        return kdforge_way(recipe, self.workload, run_dir, FIRST_LOSSES if warmup_round else 0)

    def cached(self, warmup_round: bool) -> RoundResult:
        if self.cache_problem:
            raise Unavailable(self.cache_problem)
        if warmup_round:  # the warm-up round builds the cache: start without one
            shutil.rmtree(self.cache_dir, ignore_errors=True)
        run_dir = self.workdir / "kdforge-cached"
        recipe = self.workload.cached_recipe(run_dir, self.log_every(warmup_round), self.cache_dir)
        result = kdforge_way(recipe, self.workload, run_dir, FIRST_LOSSES if warmup_round else 0)
        status = result.info.get("cache", {}).get("status")
        expected = "built" if warmup_round else "reused"
        if status != expected:
            result.info["warning"] = f"teacher cache status {status!r}, expected {expected!r}"
        return result

    def student_only(self, warmup_round: bool) -> RoundResult:
        run_dir = self.workdir / "student-only"
        recipe = self.workload.student_recipe(run_dir, self.log_every(warmup_round))
        return kdforge_way(recipe, self.workload, run_dir, FIRST_LOSSES if warmup_round else 0)


def way_runner(way: str, ref: Reference, kd: KdforgeWays, workdir: Path) -> Callable[[bool], RoundResult]:
    """A function that runs one round of ``way`` (``True``: the untimed warm-up round)."""
    keep = lambda warmup_round: FIRST_LOSSES if warmup_round else 0  # noqa: E731
    runners: dict[str, Callable[[bool], RoundResult]] = {
        "hand-written": lambda w: hand_written(ref, keep(w)),
        "kdforge-online": kd.online,
        "kdforge-cached": kd.cached,
        "torchdistill": lambda w: torchdistill_way(
            ref, keep(w), workdir / ref.workload.name / "torchdistill.yaml" if w else None),
        "student-only": kd.student_only,
    }
    return runners[way]


def run_round(runner: Callable[[bool], RoundResult], warmup_round: bool, threads: int) -> RoundResult:
    """One round of one way at ``threads`` intra-op threads; checks nothing changed the thread count."""
    torch.set_num_threads(threads)
    try:
        result = runner(warmup_round)
    finally:
        gc.collect()
    after = torch.get_num_threads()
    if after != threads:
        result.info["warning"] = f"the thread count changed to {after} during the run"
    result.info["threads"] = threads
    return result

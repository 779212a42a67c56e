"""The benchmark's workloads, their kdforge recipes, and what the non-kdforge ways share.

Each workload is derived from a shipped recipe (``recipes/cifar10/kd-*.yaml`` and
``recipes/digits/kd.yaml``) with the changes a speed benchmark needs: synthetic CIFAR-shaped
data instead of CIFAR-10, untrained torchvision teachers instead of trained checkpoints,
batch 64, float32, no DataLoader workers and a constant learning rate. ``Reference`` holds
the models and the batch order kdforge itself uses, so the hand-written loop and
torchdistill take the very same steps (their first loss is printed next to kdforge's).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import Sampler

ROOT = Path(__file__).resolve().parents[1]
BATCH_SIZE = 64
TEMPERATURE = 4.0
CE_WEIGHT, KD_WEIGHT = 0.1, 0.9
#: the CIFAR recipes' SGD, at a constant lr (their cosine schedule does not change the cost of a step)
CIFAR_SGD = {"name": "sgd", "params": {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.0005, "nesterov": True}}
CIFAR_PAIRS = {
    "vgg16-mobilenet_v2": ("kd-mobilenet_v2-from-vgg16.yaml", "vgg16"),
    "resnet50-resnet18": ("kd-resnet18-from-resnet50.yaml", "resnet50"),
}
WORKLOADS = [*CIFAR_PAIRS, "digits"]
#: the ways the same workload runs, in the order they are listed
WAYS = ["hand-written", "kdforge-online", "kdforge-cached", "torchdistill", "student-only"]


@dataclass
class Workload:
    """One workload: its kdforge recipe (teacher online) and how many steps a round times."""

    name: str
    recipe: dict[str, Any]  # the KD recipe, teacher online; output_dir and log_every are set per run
    warmup_steps: int  # steps of each run that are not timed (kdforge's first logging interval)
    epochs: int
    steps_per_epoch: int
    train_size: int
    source: str  # the shipped recipe it is derived from

    @property
    def timed_steps(self) -> int:
        return self.epochs * self.steps_per_epoch - self.warmup_steps

    def batch_sizes(self) -> list[int]:
        """The size of each step's batch, over the whole run (drop_last is false)."""
        last = self.train_size - (self.steps_per_epoch - 1) * BATCH_SIZE
        return ([BATCH_SIZE] * (self.steps_per_epoch - 1) + [last]) * self.epochs

    @property
    def timed_samples(self) -> int:
        return sum(self.batch_sizes()[self.warmup_steps:])

    def kd_recipe(self, run_dir: Path, log_every: int) -> dict[str, Any]:
        recipe = copy.deepcopy(self.recipe)
        recipe["output_dir"] = str(run_dir)
        recipe["trainer"]["log_every"] = log_every
        return recipe

    def cached_recipe(self, run_dir: Path, log_every: int, cache_dir: Path) -> dict[str, Any]:
        recipe = self.kd_recipe(run_dir, log_every)
        recipe["teacher"]["cache"] = {"views": 1, "dtype": "float16", "top_k": None, "dir": str(cache_dir)}
        return recipe

    def student_recipe(self, run_dir: Path, log_every: int) -> dict[str, Any]:
        recipe = self.kd_recipe(run_dir, log_every)
        recipe.pop("teacher")
        recipe["name"] += "-student"
        recipe["losses"] = [{"name": "ce", "weight": 1.0}]
        return recipe


def _shipped(path: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "recipes" / path).read_text())


def _trainer(epochs: int) -> dict[str, Any]:
    # checkpoints only at the end: they are written between logging intervals, so they are not
    # timed, but they would lengthen the digits runs
    return {"epochs": epochs, "batch_size": BATCH_SIZE, "mixed_precision": "no", "num_workers": 0,
            "progress_bar": False, "checkpoint_every": 10_000, "keep_checkpoints": 1}


def cifar_workload(name: str, steps: int, warmup: int = 3) -> Workload:
    """A seeds' CIFAR-10 pair on synthetic 3x32x32 data, one epoch of ``warmup + steps`` batches."""
    file, teacher_arch = CIFAR_PAIRS[name]
    shipped = _shipped(f"cifar10/{file}")
    total = warmup + steps
    recipe = {
        "name": f"bench-{name}",
        "seed": 0,
        "data": {"name": "synthetic", "params": {"shape": [3, 32, 32], "num_classes": 10,
                                                 "train_size": total * BATCH_SIZE, "eval_size": 0}},
        "teacher": {"name": "torchvision", "params": {"arch": teacher_arch}},
        "student": shipped["student"],
        "losses": shipped["losses"],
        "optimizer": copy.deepcopy(CIFAR_SGD),
        "trainer": _trainer(1),
    }
    return Workload(name, recipe, warmup, 1, total, total * BATCH_SIZE, f"recipes/cifar10/{file}")


def digits_workload(teacher_dir: Path, timed_epochs: int) -> Workload:
    """The digits demo's distillation (recipes/digits/kd.yaml): one warm-up epoch, then ``timed_epochs``."""
    shipped = _shipped("digits/kd.yaml")
    recipe = {
        "name": "bench-digits",
        "seed": shipped.get("seed", 0),
        "data": shipped["data"],
        "teacher": {"name": "checkpoint", "params": {"path": str(teacher_dir)}},
        "student": shipped["student"],
        "losses": shipped["losses"],
        "optimizer": shipped["optimizer"],
        "trainer": _trainer(1 + timed_epochs),
    }
    train_size = 1257  # the digits train split at the recipe's defaults (test_fraction 0.3)
    steps_per_epoch = math.ceil(train_size / BATCH_SIZE)
    return Workload("digits", recipe, steps_per_epoch, 1 + timed_epochs, steps_per_epoch, train_size,
                    "recipes/digits/kd.yaml")


def check_losses(recipe: dict[str, Any]) -> None:
    """The ways outside kdforge hard-code 0.1 CE + 0.9 T^2 KL(T=4): refuse a recipe that says otherwise."""
    expected = [{"name": "ce", "weight": CE_WEIGHT}, {"name": "kd", "weight": KD_WEIGHT,
                                                       "params": {"temperature": TEMPERATURE}}]
    if recipe["losses"] != expected:
        raise SystemExit(f"bench: the recipe's losses changed ({recipe['losses']}); update bench_ways.py to match")


# -- what the hand-written loop and torchdistill share with kdforge -------------------------------
def kdforge_epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of kdforge's training loader in ``epoch``.

    kdforge's loader goes through Accelerate with ``use_seedable_sampler`` and ``data_seed``
    = the recipe's seed: each epoch is ``torch.randperm`` from a generator seeded with
    ``seed + epoch``. The first losses printed side by side check that this still holds.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n, generator=generator).tolist()


class EpochOrders(Sampler[int]):
    """A sampler that yields ``orders[0]`` on its first pass, ``orders[1]`` on its second, ..."""

    def __init__(self, orders: list[list[int]]) -> None:
        self.orders = orders
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.orders[self.epoch % len(self.orders)])

    def __iter__(self):
        order = self.orders[self.epoch % len(self.orders)]
        self.epoch += 1
        return iter(order)


@dataclass
class Reference:
    """kdforge's own models (as its recipe builds them), train split and sample order."""

    workload: Workload
    student: nn.Module  # at its initial weights; ``fresh_student`` gives a copy to train
    teacher: nn.Module | None
    dataset: Any
    orders: list[list[int]] = field(default_factory=list)
    initial: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, workload: Workload) -> Reference:
        # kdforge's recipe loader and builder: private modules, the same ones kdforge.run uses
        from kdforge.build import build_run
        from kdforge.recipe import load_recipe

        recipe = load_recipe(workload.kd_recipe(Path("unused"), 1))
        built = build_run(recipe)
        teacher = built.teacher.eval().requires_grad_(False)
        dataset = built.splits.train
        if len(dataset) != workload.train_size:
            raise SystemExit(f"bench: {workload.name} has {len(dataset)} training samples, "
                             f"expected {workload.train_size}")
        orders = [kdforge_epoch_order(len(dataset), recipe.seed, e) for e in range(workload.epochs)]
        return cls(workload, built.student, teacher, dataset, orders,
                   copy.deepcopy(built.student.state_dict()))

    def fresh_student(self) -> nn.Module:
        student = copy.deepcopy(self.student)
        student.load_state_dict(self.initial)
        return student.train()

    def sampler(self) -> EpochOrders:
        return EpochOrders(self.orders)

    def optimizer(self, student: nn.Module) -> torch.optim.Optimizer:
        """The recipe's optimizer with kdforge's weight-decay groups (none on biases and norm weights)."""
        spec = self.workload.recipe["optimizer"]
        params = dict(spec["params"])
        weight_decay = params.pop("weight_decay", 0.0)
        decay = [p for p in student.parameters() if p.ndim > 1]
        no_decay = [p for p in student.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        cls = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[spec["name"]]
        return cls(groups, **params)

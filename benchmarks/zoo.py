"""The method zoo on digits: every recipe of recipes/digits/zoo/ trained with several seeds.

Each recipe (one per method, named after it) is trained once per seed with ``seed`` overridden,
into runs/zoo/<method>-s<seed>; the digits teacher (recipes/digits/teacher.yaml, into
runs/digits-teacher) is trained first when missing. A method in several stages has its
earlier stages as ``<method>-stage<k>.yaml``: for every seed they are trained first (into
runs/zoo/<method>-stage<k>-s<seed>), and the method's recipe is run with every reference to a
stage's ``output_dir`` pointed at that seed's stage run; stages are not reported on their own.

Prints a table of each method's top-1 accuracy (mean +- sample std over the seeds) and its
difference to the student alone (``baseline``) and to plain ``kd``, and writes it to
runs/zoo/zoo.json (methods not run this time keep their earlier entries).

Usage: python benchmarks/zoo.py [--seeds 0 1 2] [--only dkd,sp] [--epochs 1] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from pathlib import Path
from typing import Any

import torch
import yaml

import kdforge

ROOT = Path(__file__).resolve().parent.parent
ZOO = Path("recipes/digits/zoo")
TEACHER_RECIPE, TEACHER_RUN = Path("recipes/digits/teacher.yaml"), Path("runs/digits-teacher")
OUT = Path("runs/zoo")
REFERENCES = ("baseline", "kd")
STAGE = re.compile(r"^(?P<method>.+)-stage(?P<k>\d+)$")


def discover(only: list[str] | None) -> dict[str, Path]:
    """method name -> recipe, for every recipe of the zoo folder but stages (``only``: those and the references)."""
    recipes = {p.stem: p for p in sorted(ZOO.glob("*.yaml")) if not STAGE.match(p.stem)}
    if only:
        unknown = sorted(set(only) - set(recipes))
        if unknown:
            raise SystemExit(f"zoo: no recipe for {', '.join(unknown)} in {ZOO} (have: {', '.join(recipes)})")
        recipes = {m: p for m, p in recipes.items() if m in only or m in REFERENCES}
    return recipes


def ensure_teacher() -> None:
    """Train the digits teacher unless its run directory already holds a finished run."""
    if not (TEACHER_RUN / "summary.json").exists():
        print(f"zoo: training the teacher {TEACHER_RECIPE} into {TEACHER_RUN}", flush=True)
        kdforge.run(str(TEACHER_RECIPE), {"trainer.progress_bar": False}, output_dir=str(TEACHER_RUN), overwrite=True)


def stages_of(method: str) -> list[Path]:
    """The earlier stages of a method (``<method>-stage<k>.yaml``), in order of k."""
    found = [(int(m["k"]), p) for p in ZOO.glob(f"{method}-stage*.yaml") if (m := STAGE.match(p.stem)) and m["method"] == method]
    return [p for _, p in sorted(found)]


def redirect(node: Any, moves: dict[str, str]) -> Any:
    """``node`` (a recipe) with every string equal to a key of ``moves`` replaced by its value."""
    if isinstance(node, dict):
        return {k: redirect(v, moves) for k, v in node.items()}
    if isinstance(node, list):
        return [redirect(v, moves) for v in node]
    return moves.get(node, node) if isinstance(node, str) else node


def run_one(recipe: Any, run_dir: Path, seed: int, epochs: int | None, reuse: bool) -> dict[str, Any]:
    """Train a recipe (a path or a mapping) for one seed into ``run_dir``; return its summary."""
    summary_file = run_dir / "summary.json"
    if reuse and summary_file.exists() and (run_dir / "recipe.yaml").exists():
        done = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        wanted = epochs if epochs is not None else (recipe if isinstance(recipe, dict) else
                                                    yaml.safe_load(Path(recipe).read_text()))["trainer"]["epochs"]
        if done.get("seed") == seed and done["trainer"]["epochs"] == wanted:  # the same run, not a smoke test
            return json.loads(summary_file.read_text())
    # one checkpoint at the end is enough here: per-epoch checkpoints cost more than the digits steps
    overrides: dict[str, Any] = {"seed": seed, "trainer.progress_bar": False, "trainer.checkpoint_every": 100_000}
    if epochs is not None:
        overrides["trainer.epochs"] = epochs
    return kdforge.run(recipe, overrides, output_dir=str(run_dir), overwrite=True)


def train(method: str, recipe: Path, seed: int, epochs: int | None, reuse: bool) -> float | None:
    """Train one seed of one method (its stages first); return its student accuracy."""
    moves: dict[str, str] = {}
    for stage in stages_of(method):
        stage_dir = OUT / f"{stage.stem}-s{seed}"
        run_one(redirect(yaml.safe_load(stage.read_text()), moves), stage_dir, seed, epochs, reuse)
        declared = yaml.safe_load(stage.read_text()).get("output_dir")
        if declared:
            moves[str(declared)] = stage_dir.as_posix()
    source: Any = redirect(yaml.safe_load(recipe.read_text()), moves) if moves else str(recipe)
    return run_one(source, OUT / f"{method}-s{seed}", seed, epochs, reuse).get("student/accuracy")


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: method, seeds, accuracy mean +- std, difference to baseline and to kd (points)."""
    lines = ["| method | seeds | accuracy (%) | vs baseline | vs kd |", "| --- | --- | --- | --- | --- |"]

    def diff(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:+.2f}"

    order = [m for m in REFERENCES if m in results] + sorted(m for m in results if m not in REFERENCES)
    for method in order:
        r = results[method]
        lines.append(f"| {method} | {len(r['accuracies'])} | {100 * r['mean']:.2f} ± {100 * r['std']:.2f} | "
                     f"{diff(r.get('vs_baseline'))} | {diff(r.get('vs_kd'))} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", type=lambda s: [m.strip() for m in s.split(",") if m.strip()], default=None,
                        help="comma-separated methods (recipe names); baseline and kd are always run")
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.epochs (smoke tests)")
    parser.add_argument("--reuse", action="store_true", help="keep runs that already have a summary.json")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.chdir(ROOT)  # recipes name run directories relative to the repository root
    recipes = discover(args.only)
    ensure_teacher()
    fresh: dict[str, dict[str, Any]] = {}
    for method, recipe in recipes.items():
        accuracies = []
        for seed in args.seeds:
            accuracy = train(method, recipe, seed, args.epochs, args.reuse)
            print(f"zoo: {method} seed {seed}: {accuracy}", flush=True)
            if accuracy is not None:
                accuracies.append(float(accuracy))
        if accuracies:
            mean, std = spread(accuracies)
            fresh[method] = {"recipe": recipe.as_posix(), "seeds": args.seeds, "epochs": args.epochs,
                             "accuracies": accuracies, "mean": mean, "std": std}
    zoo_file = OUT / "zoo.json"
    previous = json.loads(zoo_file.read_text()).get("methods", {}) if zoo_file.exists() else {}
    results = {**previous, **fresh}
    for r in results.values():
        for ref in REFERENCES:
            r[f"vs_{ref}"] = r["mean"] - results[ref]["mean"] if ref in results else None
    OUT.mkdir(parents=True, exist_ok=True)
    zoo_file.write_text(json.dumps({"teacher": TEACHER_RUN.as_posix(), "methods": results}, indent=2) + "\n")
    print(table(results))
    print(f"zoo: wrote {zoo_file}")


if __name__ == "__main__":
    main()

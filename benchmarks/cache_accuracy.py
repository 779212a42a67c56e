"""What the teacher cache does to accuracy, on digits: with augmentation, and without.

Two experiments, each over several seeds (the student's seed: its initial weights, its batch
order and, with augmentation, which shifts its stored views got):

* **augmented** (``data: {name: digits, params: {labeled: 100, shift: 1}}``): a ``small_cnn``
  teacher trained on the same shifted data (``recipes/digits/teacher.yaml`` with ``shift: 1``),
  then the demo's ``mlp [64]`` student distilled from it (``recipes/digits/kd.yaml`` with
  ``shift: 1``) three ways: teacher online (a new shift of every image every epoch), the cache
  at ``views: 1`` and the cache at ``views: 4`` (the student sees only the stored shifts).
* **plain** (the digits demo as shipped, no augmentation): the demo's teacher, then the demo's
  student online, with the cache in float16 (the default) and with the cache in float32. The
  float32 student's weights are compared bit for bit with the online student's.

Every student run is evaluated on the 540-image eval split (not augmented). The table gives
eval accuracy, mean ± sample standard deviation over the seeds.

Usage: python benchmarks/cache_accuracy.py [--seeds 0 1 2] [--epochs 10] [--teacher-epochs 15]
       [--views 1 4] [--dtype float16] [--threads 1] [--out runs/cache-accuracy]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10, help="student epochs (recipes/digits/kd.yaml has 30)")
    parser.add_argument("--teacher-epochs", type=int, default=15, help="teacher epochs (recipes/digits/teacher.yaml "
                                                                       "has 15)")
    parser.add_argument("--shift", type=int, default=1, help="digits' random shift, in pixels, for the augmented runs")
    parser.add_argument("--views", type=int, nargs="+", default=[1, 4], help="cache views for the augmented runs")
    parser.add_argument("--dtype", default="float16", choices=["float32", "float16", "bfloat16"],
                        help="the cache's dtype for the augmented runs (the key's default: float16)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "cache-accuracy")
    parser.add_argument("--skip", nargs="*", default=[], choices=["augmented", "plain"], help="experiments not to run")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("give at least two --seeds (a standard deviation needs two)")
    return args


def shipped(name: str) -> dict[str, Any]:
    """A recipe of ``recipes/digits/`` as a mapping."""
    return yaml.safe_load((ROOT / "recipes" / "digits" / name).read_text())


def note(message: str) -> None:
    print(f"cache_accuracy: {message}", file=sys.stderr, flush=True)


def run(recipe: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``kdforge.run`` without a progress bar, into ``run_dir``; the summary with its wall time added."""
    import kdforge

    recipe = copy.deepcopy(recipe)
    # no bar, and one checkpoint at the end instead of one per epoch (neither changes the training)
    recipe["trainer"].update(progress_bar=False, checkpoint_every=recipe["trainer"]["epochs"], keep_checkpoints=1)
    started = time.perf_counter()
    summary = kdforge.run(recipe, output_dir=run_dir, overwrite=True)
    summary["bench/run_seconds"] = round(time.perf_counter() - started, 2)
    return summary


def train_teacher(args: argparse.Namespace, name: str, shift: int) -> tuple[Path, float]:
    """The digits teacher recipe (with ``shift``), trained under ``<out>/<name>``; its path and eval accuracy."""
    recipe = shipped("teacher.yaml")
    recipe["trainer"]["epochs"] = args.teacher_epochs
    if shift:
        recipe["data"].setdefault("params", {})["shift"] = shift
    path = args.out / name
    note(f"training {name} ({args.teacher_epochs} epochs, shift {shift})")
    return path, run(recipe, path)["student/accuracy"]


def student_recipe(args: argparse.Namespace, teacher: Path, seed: int, shift: int,
                   cache: dict[str, Any] | None) -> dict[str, Any]:
    """recipes/digits/kd.yaml with this teacher, seed, shift and cache (``None``: the teacher online)."""
    recipe = shipped("kd.yaml")
    recipe["seed"] = seed
    recipe["trainer"]["epochs"] = args.epochs
    recipe["teacher"]["params"]["path"] = str(teacher)
    if shift:
        recipe["data"]["params"]["shift"] = shift
    if cache is not None:
        recipe["teacher"]["cache"] = {"top_k": None, "dir": str(args.out / "cache"), **cache}
    return recipe


def same_weights(a: Path, b: Path) -> bool:
    """Whether two runs' student.safetensors hold bit-identical tensors."""
    from safetensors.torch import load_file

    x, y = load_file(str(a / "student.safetensors")), load_file(str(b / "student.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation."""
    return {"mean": statistics.mean(values), "std": statistics.stdev(values)}


def experiment(args: argparse.Namespace, name: str, teacher: Path, shift: int,
               variants: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """Every variant (a cache spec, or ``None`` for online) at every seed, interleaved by seed."""
    results: dict[str, Any] = {v: {"runs": []} for v in variants}
    for seed in args.seeds:
        for variant, cache in variants.items():
            run_dir = args.out / name / f"{variant}-seed{seed}"
            summary = run(student_recipe(args, teacher, seed, shift, cache), run_dir)
            entry = {"seed": seed, "accuracy": summary["student/accuracy"], "run_dir": str(run_dir),
                     "run_seconds": summary["bench/run_seconds"]}
            if "teacher/cache" in summary:
                info = summary["teacher/cache"]
                entry["cache"] = {k: info[k] for k in ("status", "build_seconds", "bytes", "views", "dtype")}
            results[variant]["runs"].append(entry)
            note(f"{name} {variant} seed {seed}: accuracy {entry['accuracy']:.4f} "
                 f"({entry['run_seconds']:.1f} s{', cache ' + entry['cache']['status'] if 'cache' in entry else ''})")
    for variant in variants:
        results[variant].update(mean_std([r["accuracy"] for r in results[variant]["runs"]]))
    return results


def format_rows(title: str, teacher_accuracy: float, results: dict[str, Any], labels: dict[str, str]) -> list[str]:
    """Markdown rows of one experiment: each variant's mean ± std and its per-seed accuracies."""
    rows = [f"| {title}: teacher (`small_cnn`, eval) | {teacher_accuracy:.4f} | - | - |"]
    for variant, label in labels.items():
        r = results[variant]
        seeds = ", ".join(f"{x['accuracy']:.4f}" for x in r["runs"])
        seconds = statistics.median(x["run_seconds"] for x in r["runs"])
        rows.append(f"| {title}: {label} | {r['mean']:.4f} ± {r['std']:.4f} | {seeds} | {seconds:.1f} |")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both experiments; print a markdown table; write ``<out>/cache_accuracy.json`` and ``.md``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(args.out / "cache", ignore_errors=True)  # every cache in the record is built here
    started = time.perf_counter()
    report: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    header = ["| student (`mlp [64]`, 100 labels + KD on 1,257 images) | eval accuracy, mean ± std | per seed "
              f"({', '.join(map(str, args.seeds))}) | s per run (median) |", "| --- | ---: | --- | ---: |"]
    rows: list[str] = []
    if "augmented" not in args.skip:
        teacher, accuracy = train_teacher(args, "teacher-shift", args.shift)
        variants: dict[str, dict[str, Any] | None] = {"online": None}
        variants.update({f"views{v}": {"views": v, "dtype": args.dtype} for v in args.views})
        results = experiment(args, "augmented", teacher, args.shift, variants)
        report["augmented"] = {"teacher_accuracy": accuracy, "shift": args.shift, **results}
        labels = {"online": "teacher online (no cache)",
                  **{f"views{v}": f"cache, `views: {v}`, {args.dtype}" for v in args.views}}
        rows += format_rows(f"shift {args.shift}", accuracy, results, labels)
    if "plain" not in args.skip:
        teacher, accuracy = train_teacher(args, "teacher-plain", 0)
        variants = {"online": None, "float16": {"dtype": "float16"}, "float32": {"dtype": "float32"}}
        results = experiment(args, "plain", teacher, 0, variants)
        identical = [same_weights(Path(a["run_dir"]), Path(b["run_dir"]))
                     for a, b in zip(results["online"]["runs"], results["float32"]["runs"])]
        report["plain"] = {"teacher_accuracy": accuracy, "float32_weights_identical_to_online": identical, **results}
        labels = {"online": "teacher online (no cache)", "float16": "cache, float16",
                  "float32": "cache, float32"}
        rows += format_rows("no augmentation", accuracy, results, labels)
        rows.append(f"| no augmentation: float32 cached weights == online weights, bit for bit | "
                    f"{'yes' if all(identical) else 'NO'} | {', '.join('yes' if i else 'no' for i in identical)} | - |")
    report["wall_seconds"] = round(time.perf_counter() - started, 1)
    table = "\n".join(header + rows)
    print(f"\n{table}\n\n({report['wall_seconds']:.0f} s; {args.epochs} student epochs, "
          f"{args.teacher_epochs} teacher epochs, {args.threads} thread(s))")
    (args.out / "cache_accuracy.json").write_text(json.dumps(report, indent=2))
    (args.out / "cache_accuracy.md").write_text(table + "\n")
    return report


if __name__ == "__main__":
    main()

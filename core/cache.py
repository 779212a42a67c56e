"""The teacher-output cache: the frozen teacher's outputs computed once, reused across epochs and runs.

A cache is a folder ``<dir>/<fingerprint>/`` of memory-mapped ``.npy`` files (no pickle) and a
``meta.json``. The fingerprint covers everything that changes the contents: the teacher's
weights, the dataset (its recipe fragment, size, and augmentation), the views, the seed when
the data is augmented, the dtype, ``top_k`` and the mixed precision the teacher runs in. A
cache is reused only on an exact match, and verified (shapes and SHA-256 of every file) when
opened. It is built under a lock in a ``.building-*`` folder that is renamed only when
complete, so a killed build is never used; with several processes each builds its shard.

Per sample the cache holds the teacher's output (for a teacher of several members, each
member's): all of it, or with ``top_k`` the k largest logits, their indices and the
log-sum-exp of the rest (the tail), from which losses get logits whose top k are exact and
whose tail carries the right total probability at temperature 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .console import is_quiet
from .errors import RecipeError
from .extensions import follows_student, teacher_members
from .outputs import Batch, ModelOutputs
from .tasks import sample_seed

CACHE_FORMAT = 1
CACHE_DIR_NAME = ".kdforge-cache"
BATCH_FIELD = "teacher_cache"  # the batch field cached rows ride in (reserved while a cache is used)
_DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
           "bfloat16": (np.uint16, torch.bfloat16)}  # numpy has no bfloat16: its bits are kept as uint16


def default_dir(run_dir: Path) -> Path:
    """The cache folder beside the run directories (``runs/.kdforge-cache`` for ``runs/<name>``)."""
    return run_dir.parent / CACHE_DIR_NAME


def view_of(seed: int, epoch: int, index: int, views: int) -> int:
    """Which stored view a sample is trained on in an epoch."""
    return sample_seed(seed, epoch, index) % views if views > 1 else 0


def view_generator(seed: int, index: int, view: int) -> torch.Generator:
    """The generator a sample's stored view ``view`` draws its augmentation from."""
    return torch.Generator().manual_seed(sample_seed(seed, -1 - view, index))


# -- reading ---------------------------------------------------------------------------------
@dataclass
class TeacherCache:
    """An opened, verified cache: memory-mapped arrays, indexed by sample and view."""

    path: Path
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def views(self) -> int:
        return int(self.meta["views"])

    @property
    def top_k(self) -> int | None:
        return self.meta["top_k"]

    @property
    def params(self) -> np.ndarray | None:
        return self.arrays.get("params")

    def rows(self, index: np.ndarray, views: np.ndarray) -> Any:
        """The stored outputs of many samples at once (collated, as ``row`` of each would be)."""
        torch_dtype = _DTYPES[self.meta["dtype"]][1]
        if self.top_k is None:
            return _tensor(self.arrays["logits"][index, views], torch_dtype)
        return {"values": _tensor(self.arrays["values"][index, views], torch_dtype),
                "indices": torch.from_numpy(np.array(self.arrays["indices"][index, views], dtype=np.int64)),
                "tail": torch.from_numpy(np.array(self.arrays["tail"][index, views], dtype=np.float32))}

    def row(self, index: int, view: int) -> Any:
        """The stored outputs of one sample's view (what a batch's ``teacher_cache`` field collates)."""
        torch_dtype = _DTYPES[self.meta["dtype"]][1]
        if self.top_k is None:
            return _tensor(self.arrays["logits"][index, view], torch_dtype)
        return {"values": _tensor(self.arrays["values"][index, view], torch_dtype),
                "indices": torch.from_numpy(np.array(self.arrays["indices"][index, view], dtype=np.int64)),
                "tail": torch.from_numpy(np.array(self.arrays["tail"][index, view], dtype=np.float32))}


def _tensor(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    copy = torch.from_numpy(np.array(array))
    return copy.view(torch.bfloat16) if dtype == torch.bfloat16 else copy


def teacher_outputs_from_cache(teacher: Any, batch: Batch, classes: int) -> tuple[ModelOutputs, list[ModelOutputs]]:
    """The teacher view and member outputs of a batch, from its ``teacher_cache`` field: no teacher forward."""
    stored = batch[BATCH_FIELD]
    if isinstance(stored, dict):  # top-k: k exact logits, the tail's mass spread evenly over the rest
        values, indices, tail = stored["values"].float(), stored["indices"], stored["tail"].float()
        rest = classes - values.shape[-1]
        fill = tail - math.log(rest) if rest > 0 else tail
        logits = fill.unsqueeze(-1).expand(*values.shape[:-1], classes).clone()
        logits.scatter_(-1, indices, values)
    else:
        logits = stored.float()
    outputs = [ModelOutputs(logits[:, m]) for m in range(logits.shape[1])]  # (batch, members, ...)
    if not teacher_members(teacher):
        return outputs[0], outputs
    return teacher.combine(outputs, batch.targets), outputs


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def open_cache(path: Path, fingerprint: str, verify: bool = True) -> TeacherCache:
    """Open a complete cache folder (with ``verify``, every file against its SHA-256); ``ValueError`` says what is wrong."""
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != fingerprint:
        raise ValueError("its fingerprint or format differs")
    arrays = {}
    for name, info in meta["files"].items():
        file = path / f"{name}.npy"
        if verify and _sha256(file) != info["sha256"]:
            raise ValueError(f"{file.name} does not match its checksum")
        array = np.load(file, mmap_mode="r", allow_pickle=False)
        if list(array.shape) != info["shape"] or str(array.dtype) != info["dtype"]:
            raise ValueError(f"{file.name} has shape {array.shape}, not {info['shape']}")
        arrays[name] = array
    return TeacherCache(path, meta, arrays)


# -- deciding what is cached -------------------------------------------------------------------
def cache_problems(built: Any, spec: Any, teacher_taps: Any, transforms: bool) -> None:
    """Refuse, naming ``teacher.cache``, what a cache cannot hold or would get wrong."""
    key = "teacher.cache"
    teacher = built.teacher
    if follows_student(teacher):
        raise RecipeError("a teacher that follows the student changes every step, so its outputs "
                          "cannot be cached; remove teacher.cache", key=key)
    if teacher_taps is not None:
        users = [t.label for t in built.losses if getattr(t.module, "teacher_taps", None)]
        raise RecipeError(f"the cache holds the teacher's outputs, not its features, and loss "
                          f"{', '.join(map(repr, users))} taps teacher features; remove teacher.cache", key=key)
    if transforms:
        raise RecipeError("a loss or the task rewrites batches before the models run (TransformsBatch), so the "
                          "teacher's outputs for the data set would not be what it sees; remove teacher.cache", key=key)
    augmented = built.splits.random_transforms
    if augmented and not callable(getattr(built.splits.train, "replay_augmented", None)):
        raise RecipeError(f"dataset {built.recipe.data.name!r} augments its training data at random and cannot replay "
                          f"an augmentation (kdforge.ReplaysAugmentation), so cached outputs would not match what the "
                          f"student sees; remove teacher.cache or make the augmentation replayable", key=key)
    if not augmented and spec.views > 1:
        raise RecipeError(f"the training data is not augmented at random, so every view would be the same; "
                          f"set views: 1", key=f"{key}.views")


def fingerprint_of(built: Any, spec: Any) -> tuple[str, dict[str, Any]]:
    """The cache's identity, and what went into it."""
    from .weights import fingerprint

    splits, recipe = built.splits, built.recipe
    augmented = splits.random_transforms
    described = {
        "format": CACHE_FORMAT,
        "teacher": {"class": type(built.teacher).__name__, "weights": fingerprint(built.teacher)},
        "task": built.task_name,
        "data": {"name": recipe.data.name, "params": recipe.model_dump(mode="json")["data"]["params"],
                 "train_size": len(splits.train)},
        "augmentation": splits.train.augmentation_spec() if augmented else None,
        "seed": recipe.seed if augmented else None,
        "views": spec.views, "dtype": spec.dtype, "top_k": spec.top_k,
        "mixed_precision": recipe.trainer.mixed_precision,
    }
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24], described


# -- building -----------------------------------------------------------------------------------
class ViewDataset(Dataset):
    """The train split's samples as stored view ``view``: augmentation drawn per (seed, index, view)."""

    def __init__(self, base: Dataset, view: int, seed: int, augmented: bool) -> None:
        self.base, self.view, self.seed, self.augmented = base, view, seed, augmented

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any, torch.Tensor]:
        if not self.augmented:
            return index, self.base[index], torch.zeros(0)
        item, params = self.base.draw_augmented(index, view_generator(self.seed, index, self.view))
        return index, item, params


def _collate(collate_fn: Any):
    from torch.utils.data import default_collate

    inner = collate_fn or default_collate

    def collate(samples: list[tuple[int, Any, torch.Tensor]]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        return (torch.tensor([s[0] for s in samples]), inner([s[1] for s in samples]),
                torch.stack([s[2] for s in samples]))

    return collate


class CacheBuilder:
    """Writes one cache folder: memory-mapped arrays filled shard by shard, then checksummed and renamed."""

    def __init__(self, built: Any, spec: Any, accelerator: Any, root: Path, fingerprint: str,
                 described: dict[str, Any]) -> None:
        self.built, self.spec, self.acc, self.root = built, spec, accelerator, root
        self.fingerprint, self.described = fingerprint, described

    def build(self) -> None:
        """Compute the teacher's outputs for every sample and view (all processes call this)."""
        acc, spec, built = self.acc, self.spec, self.built
        tmp = self.root / f".building-{self.fingerprint}-{self._token()}"
        n, views = len(built.splits.train), spec.views
        shape = self._output_shape()
        members = max(len(teacher_members(built.teacher)), 1)
        params_size = self._params_size()
        if acc.is_main_process:
            tmp.mkdir(parents=True)
            for name, (dtype, dims) in self._layout(n, views, members, shape, params_size).items():
                np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=dims).flush()
        acc.wait_for_everyone()
        arrays = {p.stem: np.load(p, mmap_mode="r+") for p in tmp.glob("*.npy")}
        self._fill(arrays, n, views)
        for array in arrays.values():
            array.flush()
        del arrays
        acc.wait_for_everyone()
        if acc.is_main_process:
            files = {}
            for path in sorted(tmp.glob("*.npy")):
                array = np.load(path, mmap_mode="r")
                files[path.stem] = {"shape": list(array.shape), "dtype": str(array.dtype), "sha256": _sha256(path)}
            meta = {"format": CACHE_FORMAT, "fingerprint": self.fingerprint, "views": views, "dtype": spec.dtype,
                    "top_k": spec.top_k, "samples": n, "members": members, "output_shape": list(shape),
                    "created": time.time(), "described": self.described, "files": files}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str), encoding="utf-8")
            final = self.root / self.fingerprint
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        acc.wait_for_everyone()

    def _token(self) -> str:
        from accelerate.utils import broadcast_object_list

        token = [uuid.uuid4().hex[:12] if self.acc.is_main_process else None]
        if self.acc.num_processes > 1:
            broadcast_object_list(token)
        return str(token[0])

    def _output_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the teacher's output (classes last), from the dry run's batch."""
        from .dryrun import sample_batch
        from .forward import teacher_outputs

        batch = sample_batch(self.built, self.built.splits.train, size=1).to(self.acc.device)
        with torch.no_grad():
            view, _ = teacher_outputs(self.built.task, self.built.teacher, batch, None)
        return tuple(view.logits.shape[1:])

    def _params_size(self) -> int:
        if not self.built.splits.random_transforms:
            return 0
        _, params = self.built.splits.train.draw_augmented(0, view_generator(0, 0, 0))
        return int(params.numel())

    def _layout(self, n: int, views: int, members: int, shape: tuple[int, ...], params: int) -> dict[str, Any]:
        np_dtype = _DTYPES[self.spec.dtype][0]
        head = (n, views, members, *shape[:-1])
        if self.spec.top_k is None:
            layout = {"logits": (np_dtype, (*head, shape[-1]))}
        else:
            k = min(self.spec.top_k, shape[-1])
            layout = {"values": (np_dtype, (*head, k)), "indices": (np.int32, (*head, k)), "tail": (np.float32, head)}
        if params:
            layout["params"] = (np.float32, (n, views, params))
        return layout

    def _fill(self, arrays: dict[str, np.ndarray], n: int, views: int) -> None:
        from .forward import teacher_outputs
        from .tasks import read_batch

        acc, built = self.acc, self.built
        trainer = built.recipe.trainer
        shard = list(range(acc.process_index, n, acc.num_processes))
        bar = None
        if acc.is_local_main_process and trainer.progress_bar and not is_quiet():
            from tqdm.auto import tqdm

            bar = tqdm(total=len(shard) * views, desc="teacher cache", leave=False, dynamic_ncols=True, file=sys.stderr)
        teacher = built.teacher.eval()
        for view in range(views):
            dataset = ViewDataset(built.splits.train, view, built.recipe.seed, built.splits.random_transforms)
            loader = DataLoader(dataset, batch_size=trainer.batch_size, sampler=shard, num_workers=trainer.num_workers,
                                collate_fn=_collate(built.splits.collate_fn))
            for index, item, params in loader:
                batch = read_batch(built.task, (index, item)).to(acc.device)
                with torch.no_grad(), acc.autocast():
                    _, outputs = teacher_outputs(built.task, teacher, batch, None)
                logits = torch.stack([o.logits for o in outputs], dim=1).float().cpu()  # (batch, members, ...)
                rows = index.numpy()
                self._store(arrays, rows, view, logits)
                if "params" in arrays:
                    arrays["params"][rows, view] = params.numpy()
                if bar is not None:
                    bar.update(len(rows))
        if bar is not None:
            bar.close()

    def _store(self, arrays: dict[str, np.ndarray], rows: np.ndarray, view: int, logits: torch.Tensor) -> None:
        torch_dtype = _DTYPES[self.spec.dtype][1]

        def as_numpy(t: torch.Tensor) -> np.ndarray:
            t = t.to(torch_dtype)
            return (t.view(torch.uint16) if torch_dtype == torch.bfloat16 else t).numpy()

        if self.spec.top_k is None:
            arrays["logits"][rows, view] = as_numpy(logits)
            return
        k = arrays["values"].shape[-1]
        top = logits.topk(k, dim=-1)
        rest = logits.scatter(-1, top.indices, float("-inf"))
        tail = torch.logsumexp(rest, dim=-1) if k < logits.shape[-1] else torch.full(logits.shape[:-1], float("-inf"))
        arrays["values"][rows, view] = as_numpy(top.values)
        arrays["indices"][rows, view] = top.indices.to(torch.int32).numpy()
        arrays["tail"][rows, view] = tail.numpy()


# -- the whole step: open, or build then open ---------------------------------------------------
def prepare_cache(built: Any, spec: Any, accelerator: Any, run_dir: Path) -> tuple[TeacherCache, dict[str, Any]]:
    """The cache this run uses (built under a lock when there is none), and what the summary records."""
    root = Path(spec.dir) if spec.dir else default_dir(run_dir)
    fingerprint, described = fingerprint_of(built, spec)
    final = root / fingerprint
    status, seconds = "reused", 0.0
    lock = None
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        lock = _lock(root / f".lock-{fingerprint}")  # another run building the same cache: wait for it
    try:
        if _needs_build(final, fingerprint, accelerator):
            if accelerator.is_main_process:
                for stale in root.glob(f".building-{fingerprint}-*"):
                    shutil.rmtree(stale, ignore_errors=True)  # a build that was killed: never used
            started = time.perf_counter()
            CacheBuilder(built, spec, accelerator, root, fingerprint, described).build()
            status, seconds = "built", time.perf_counter() - started
        cache = open_cache(final, fingerprint, verify=False)  # verified once, by the main process
    finally:
        if lock is not None:
            os.close(lock)
    size = sum((final / f"{name}.npy").stat().st_size for name in cache.meta["files"])
    info = {"status": status, "build_seconds": round(seconds, 3), "bytes": size, "path": str(final),
            "fingerprint": fingerprint, "views": cache.views, "dtype": spec.dtype, "top_k": spec.top_k}
    return cache, info


def _lock(path: Path) -> int:
    """An exclusive ``flock`` on ``path`` (blocking); the file descriptor, to close when done."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _needs_build(final: Path, fingerprint: str, accelerator: Any) -> bool:
    """Whether the cache must be built: none there, or one that fails its check (then it is rebuilt)."""
    from accelerate.utils import broadcast_object_list

    verdict: list[Any] = [None]
    if accelerator.is_main_process:
        if not (final / "meta.json").is_file():
            verdict = [True]
        else:
            try:
                open_cache(final, fingerprint, verify=True)
                verdict = [False]
            except (OSError, ValueError, KeyError) as exc:
                print(f"kdforge: note: the teacher cache {final} failed its check ({exc}); building it again",
                      flush=True)
                verdict = [True]
    if accelerator.num_processes > 1:
        broadcast_object_list(verdict)
    return bool(verdict[0])


# -- the command line: list and clear --------------------------------------------------------------
def list_caches(root: Path) -> list[dict[str, Any]]:
    """Every complete cache under ``root``, newest first."""
    found = []
    for meta_file in root.glob("*/meta.json"):
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        folder = meta_file.parent
        size = sum(p.stat().st_size for p in folder.glob("*.npy"))
        described = meta.get("described", {})
        found.append({"fingerprint": folder.name, "path": str(folder), "bytes": size,
                      "teacher": described.get("teacher", {}).get("class"),
                      "data": described.get("data", {}).get("name"), "samples": meta.get("samples"),
                      "views": meta.get("views"), "dtype": meta.get("dtype"), "top_k": meta.get("top_k"),
                      "created": meta.get("created")})
    return sorted(found, key=lambda c: c.get("created") or 0, reverse=True)


def clear_caches(root: Path, fingerprints: list[str] | None) -> list[str]:
    """Delete the named caches (prefixes work), or every cache and unfinished build; return what went."""
    removed = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir():
            continue
        name = folder.name
        wanted = fingerprints is None or any(name.startswith(f) for f in fingerprints)
        if wanted and ((folder / "meta.json").is_file() or (fingerprints is None and name.startswith(".building-"))):
            shutil.rmtree(folder)
            removed.append(name)
    return removed

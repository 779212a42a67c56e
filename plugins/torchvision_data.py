"""torchvision-backed dataset helpers, imported only when a recipe uses CIFAR or image folders
(importing torchvision costs about a second, which ``kdforge plugins`` should not pay).

Two safety rules hold here, whatever the recipe says:

- CIFAR batch files are pickles, and unpickling can run code. They are read with
  ``CifarUnpickler``, which builds only what the real files hold (a dict of numpy
  arrays, lists, strings and ints) and refuses every other global with a
  ``RecipeError`` naming the file, so a doctored file never runs its payload.
- An image folder is walked without following a folder twice (symlink loops end),
  and every image's header is checked when the dataset is built, so a corrupt, empty,
  truncated or oversized file is one ``RecipeError`` naming it (or, with
  ``on_bad_image: skip``, a counted, reported omission), never a traceback mid-training.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.datasets.utils import check_integrity, download_and_extract_archive

from kdforge import Chain, DataSplits, HorizontalFlip, RandomCrop, RecipeError, ReplayableDataset, with_labeled

ROOT_KEY = "data.params.root"


# -- CIFAR: pickles without code ----------------------------------------------------------
class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that real CIFAR files never contain."""

    def __init__(self, name: str) -> None:
        super().__init__(f"refused global {name}")
        self.name = name


_NUMERIC_DTYPES = frozenset(
    kind + str(size) for kind in "iu" for size in (1, 2, 4, 8)
) | {"b1", "f2", "f4", "f8"}
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy.(_)core.multiarray._reconstruct


def _checked_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    """``numpy.core.multiarray._reconstruct`` for plain ndarrays only (no subclasses)."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array of type {subtype!r}, not numpy.ndarray")
    return _RECONSTRUCT(np.ndarray, shape, dtype_code)


def _checked_dtype(spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
    """``numpy.dtype`` for numeric dtypes only: no object arrays, whose items would be more pickles."""
    if not isinstance(spec, str) or spec not in _NUMERIC_DTYPES:
        raise pickle.UnpicklingError(f"array dtype {spec!r}, not a numeric one")
    return np.dtype(spec, bool(align), bool(copy))


def _latin1_bytes(text: Any, encoding: Any = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol 2: a str to latin-1 bytes, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode of {type(text).__name__} with {encoding!r}")
    return text.encode("latin1")


# The real files (Python 2 cPickle, protocol 2) name only the first three globals; a copy
# re-pickled by Python 3 at protocol 2 adds _codecs.encode (its bytes) and, from numpy 2,
# numpy._core for numpy.core. Every callable is a checked stand-in, never the general one.
CIFAR_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _checked_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _checked_dtype,
    ("_codecs", "encode"): _latin1_bytes,
}


class CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what CIFAR's python-format files contain.

    ``find_class`` answers the globals of ``CIFAR_GLOBALS`` (numpy arrays of numeric
    dtype, latin-1 bytes) and raises ``ForbiddenGlobal`` for any other, so no pickle
    read with it can call ``os.system``, ``builtins.eval`` or any other function.
    Persistent ids are refused too (the base class does that).
    """

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102 - see the class docstring
        try:
            return CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"{module}.{name}") from None


def _str_key(key: Any) -> Any:
    return key.decode("latin1") if isinstance(key, bytes) else key


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def read_cifar_pickle(path: str, title: str) -> dict[str, Any]:
    """One CIFAR file as a dict with str keys, read without running code.

    Keys may be str (the release read with ``encoding='latin1'``, as torchvision does)
    or bytes (a copy re-pickled by Python 3). Anything that is not such a dict is a
    ``RecipeError`` (key ``data.params.root``) saying the file is not a real CIFAR file.
    """
    try:
        with open(path, "rb") as f:
            entry = CifarUnpickler(f, encoding="latin1").load()
    except ForbiddenGlobal as exc:
        raise _not_cifar(path, title, f"its pickle would call {exc.name}, which {title}'s files never contain "
                                      "(they hold numpy arrays, lists and strings only); kdforge did not load it") from None
    except OSError as exc:
        raise RecipeError(f"cannot read '{path}': {exc.strerror or exc}", key=ROOT_KEY) from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is not CIFAR's
        raise _not_cifar(path, title, f"it cannot be read as a {title} pickle ({_reason(exc)})") from None
    if not isinstance(entry, dict) or not all(isinstance(k, (str, bytes)) for k in entry):
        raise _not_cifar(path, title, f"it holds a {type(entry).__name__}, not a dict of named fields")
    return {_str_key(k): v for k, v in entry.items()}


def _not_cifar(path: str, title: str, why: str) -> RecipeError:
    return RecipeError(f"'{path}' is not a real {title} file: {why}; delete the folder and set download: true "
                       "to fetch the official release", key=ROOT_KEY)


def _read_batch(path: str, title: str, label_key: str, num_classes: int) -> tuple[np.ndarray, list[int]]:
    """A batch file's images (N, 3072 uint8) and labels, checked against the real format."""
    entry = read_cifar_pickle(path, title)
    data = entry.get("data")
    labels = entry.get("labels" if "labels" in entry else label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim < 1 or data.size != len(data) * 3072:
        got = f"an {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise _not_cifar(path, title, f"its 'data' is {got}, not uint8 rows of 3072 pixel values")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise _not_cifar(path, title, f"it has {len(data)} images but no list of {len(data)} '{label_key}'")
    try:
        targets = [int(t) for t in labels]
    except (TypeError, ValueError):
        raise _not_cifar(path, title, f"its '{label_key}' are not integers") from None
    for i, t in enumerate(targets):
        if not 0 <= t < num_classes:
            raise _not_cifar(path, title, f"label {t} of image {i} is outside 0..{num_classes - 1}")
    return data.reshape(-1, 3072), targets


def _read_classes(path: str, title: str, key: str) -> list[str]:
    names = read_cifar_pickle(path, title).get(key)
    if not isinstance(names, list) or not names:
        raise _not_cifar(path, title, f"it has no list of '{key}'")
    return [_text(n) for n in names]


class CifarArrays(Dataset):
    """CIFAR images held as a (N, 32, 32, 3) uint8 array: torchvision's CIFAR10 without its pickle reading.

    Items are ``(transform(PIL image), label)`` in file order, exactly as torchvision's
    ``CIFAR10``/``CIFAR100`` give them; ``targets``, ``classes`` and ``class_to_idx`` as there.
    """

    def __init__(self, data: np.ndarray, targets: list[int], classes: list[str], transform: Callable | None) -> None:
        self.data = data
        self.targets = targets
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.data[index])
        return (self.transform(image) if self.transform is not None else image), self.targets[index]


@dataclass(frozen=True)
class _CifarSpec:
    title: str
    official: type[CIFAR10]
    label_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10_SPEC = _CifarSpec("CIFAR-10", CIFAR10, "labels", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_SPEC = _CifarSpec("CIFAR-100", CIFAR100, "fine_labels", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def _cifar_files(spec: _CifarSpec) -> dict[str, str]:
    """File name -> official md5, for every file of the release that is read."""
    tv = spec.official
    files = {name: md5 for name, md5 in tv.train_list + tv.test_list}
    files[tv.meta["filename"]] = tv.meta["md5"]
    return files


def _prepare_cifar(spec: _CifarSpec, root: str, download: bool, verify: bool) -> None:
    """Make sure the files are under ``root`` (downloading only if asked), or raise ``RecipeError``."""
    folder = os.path.join(root, spec.official.base_folder)
    files = _cifar_files(spec)

    def missing() -> list[str]:
        return [name for name in files if not os.path.isfile(os.path.join(folder, name))]

    def mismatched() -> list[str]:
        return [name for name, md5 in files.items() if not check_integrity(os.path.join(folder, name), md5)]

    def fetch() -> None:
        tv = spec.official
        download_and_extract_archive(tv.url, root, filename=tv.filename, md5=tv.tgz_md5)

    fetched = False
    if download and missing():
        fetch()
        fetched = True
    absent = missing()
    if len(absent) == len(files):
        raise RecipeError(
            f"{spec.title} not found under '{root}' (expected {spec.official.base_folder}/); "
            "set download: true to fetch it, or point root at an existing copy",
            key=ROOT_KEY,
        )
    if absent:
        raise RecipeError(
            f"{spec.title} under '{root}' is incomplete: {spec.official.base_folder}/ lacks "
            f"{', '.join(absent)}; set download: true to fetch it again, or point root at a complete copy",
            key=ROOT_KEY,
        )
    if not verify:
        return
    bad = mismatched()
    if bad and download and not fetched:
        fetch()
        bad = mismatched()
    if bad:
        raise RecipeError(
            f"{spec.title} under '{root}' does not match the official release (md5 of "
            f"{spec.official.base_folder}/{', '.join(bad)}); set download: true to fetch a fresh copy, "
            "or verify: false to use a custom copy in the same format",
            key=ROOT_KEY,
        )


def load_cifar_split(spec: _CifarSpec, root: str, train: bool, transform: Callable | None) -> CifarArrays:
    """One split of the python-format files under ``root``, read with ``CifarUnpickler``."""
    folder = os.path.join(root, spec.official.base_folder)
    classes = _read_classes(os.path.join(folder, spec.official.meta["filename"]), spec.title, spec.official.meta["key"])
    batches = [_read_batch(os.path.join(folder, name), spec.title, spec.label_key, len(classes))
               for name, _ in (spec.official.train_list if train else spec.official.test_list)]
    data = np.vstack([d for d, _ in batches]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))  # rows are RGB planes
    return CifarArrays(np.ascontiguousarray(data), [t for _, ts in batches for t in ts], classes, transform)


def cifar(
    spec: _CifarSpec,
    root: str,
    download: bool,
    augment: bool,
    verify: bool,
    labeled: int | None,
    drop_unlabeled: bool,
    label_seed: int,
) -> DataSplits:
    """The ``cifar10`` / ``cifar100`` datasets (see ``kdforge.plugins.datasets``)."""
    _prepare_cifar(spec, root, download, verify)
    normalize = transforms.Normalize(spec.mean, spec.std)
    eval_split = load_cifar_split(spec, root, False, transforms.Compose([transforms.ToTensor(), normalize]))
    if augment:  # replayable, so that the teacher cache can store views and replay them exactly
        images = load_cifar_split(spec, root, True, transforms.ToTensor())
        train: Dataset = ReplayableDataset(images, Chain([RandomCrop(32, padding=4), HorizontalFlip()]),
                                           finish=normalize, finish_spec={"normalize": [spec.mean, spec.std]})
        classes = images.classes
    else:
        train = load_cifar_split(spec, root, True, transforms.Compose([transforms.ToTensor(), normalize]))
        classes = train.classes
    return DataSplits(
        train=with_labeled(train, train.targets, labeled, drop_unlabeled, label_seed),
        eval=eval_split,
        num_classes=len(classes),
        input_shape=(3, 32, 32),
        random_transforms=augment,
    )


# -- image folders: a walk that ends, files that are checked -------------------------------
OnBadImage = Literal["error", "skip"]
EXAMPLES_KEPT = 5
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk every complete PNG ends with
_JPEG_END = b"\xff\xd9"  # EOI marker
_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


@dataclass(frozen=True)
class BadEntry:
    """A file (or folder link) left out of an image folder, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _bomb_reason(exc: BaseException) -> str:
    found = _BOMB.search(str(exc))
    pixels = f"{int(found.group(1)):,} pixels" if found else "more pixels than PIL allows"
    limit = int(found.group(2)) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return (f"it has {pixels}, above the decompression-bomb limit {limit:,} (2 x PIL.Image.MAX_IMAGE_PIXELS), "
            "so PIL refuses to decode it (a genuine image needs a smaller copy)")


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        return _bomb_reason(exc)
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image PIL can read (corrupt, or not an image at all)"
    if isinstance(exc, OSError) and "truncated" in str(exc).lower():
        return f"truncated: the file ends before the image does ({' '.join(str(exc).split())})"
    return _reason(exc)


def check_image_file(path: str) -> str | None:
    """Why ``path`` is not a readable image (``None`` when its header looks whole), without decoding pixels.

    Reads the header (``PIL.Image.open``: format, size, the decompression-bomb check) and
    the file's last bytes: a PNG must end with its IEND chunk, a JPEG with its EOI marker.
    Only a file that does not is read in full (PNG chunk checksums, a 1/8-scale JPEG decode),
    so files with trailing bytes after a complete image still pass.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        if os.path.islink(path):
            return f"dangling symlink (to '{os.readlink(path)}', which does not exist)"
        return f"cannot be read: {exc.strerror or exc}"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size == 0:
        return "empty file (0 bytes)"
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(f)
            if image.format in ("PNG", "JPEG"):
                end = _PNG_END if image.format == "PNG" else _JPEG_END
                f.seek(-len(end), os.SEEK_END)
                if f.read(len(end)) != end:
                    f.seek(0)
                    whole = Image.open(f)
                    if whole.format == "PNG":
                        whole.verify()
                    else:
                        whole.draft("RGB", (1, 1))
                        whole.load()
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a broken file
        return _describe_failure(exc)
    return None


def walk_once(top: str, seen: set[tuple[int, int]], bad: list[BadEntry]) -> list[tuple[str, list[str]]]:
    """``(folder, file names)`` of every folder under ``top``, like ``os.walk(top, followlinks=True)``,
    but each real folder (``st_dev``, ``st_ino``) is entered once.

    Folder symlinks are followed; one that leads to a folder already in ``seen`` (a link to
    ``.`` or ``..``, or a second link to the same place) is recorded in ``bad`` instead,
    so the walk always ends. Folders that cannot be listed are recorded in ``bad`` too.
    """
    found: list[tuple[str, list[str]]] = []
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            bad.append(BadEntry(folder, f"cannot list folder: {exc.strerror or exc}"))
            continue
        files, subfolders = [], []
        for entry in entries:
            try:
                is_dir = entry.is_dir()  # follows symlinks, as os.walk does
            except OSError:
                is_dir = False
            if not is_dir:
                files.append(entry.name)
                continue
            try:
                info = os.stat(entry.path)
            except OSError as exc:
                bad.append(BadEntry(entry.path, f"cannot open folder: {exc.strerror or exc}"))
                continue
            identity = (info.st_dev, info.st_ino)
            if identity in seen:
                what = "symlink" if entry.is_symlink() else "folder"
                bad.append(BadEntry(entry.path, f"{what} to '{os.path.realpath(entry.path)}', a folder already read "
                                                "(a symlink loop or a second link to the same folder)"))
                continue
            seen.add(identity)
            subfolders.append(entry.path)
        found.append((folder, files))
        stack.extend(reversed(subfolders))
    return found


def find_image_classes(split_dir: str) -> list[str]:
    """Sorted class folder names of ``split_dir`` (as ImageFolder finds them), checked not to alias each other."""
    try:
        with os.scandir(split_dir) as it:
            classes = sorted(e.name for e in it if _is_dir(e))
    except OSError as exc:
        raise RecipeError(f"cannot list '{split_dir}': {exc.strerror or exc}", key=ROOT_KEY) from None
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {split_dir}.")
    where: dict[tuple[int, int], str] = {_identity(split_dir): "."}
    for name in classes:
        identity = _identity(os.path.join(split_dir, name))
        if identity in where:
            other = "the split folder itself" if where[identity] == "." else f"class folder '{where[identity]}'"
            raise RecipeError(f"class folder '{os.path.join(split_dir, name)}' is a link to {other}; "
                              "every class needs its own folder", key=ROOT_KEY)
        where[identity] = name
    return classes


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _identity(path: str) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino


def scan_image_folder(split_dir: str) -> tuple[list[str], list[tuple[str, int]], list[BadEntry]]:
    """Classes, ``(path, class index)`` samples in ImageFolder's order, and the entries that are not readable images.

    The order is torchvision's ``ImageFolder``: classes sorted, then the folders of each
    class's walk sorted by path, then file names sorted; files are those with one of
    torchvision's image extensions (``IMG_EXTENSIONS``). Every such file gets
    ``check_image_file``; the ones that fail are in the third list, not in the samples.
    """
    classes = find_image_classes(split_dir)
    seen = {_identity(split_dir)} | {_identity(os.path.join(split_dir, c)) for c in classes}
    samples: list[tuple[str, int]] = []
    bad: list[BadEntry] = []
    for index, name in enumerate(classes):
        for folder, files in sorted(walk_once(os.path.join(split_dir, name), seen, bad)):
            for file_name in sorted(files):
                path = os.path.join(folder, file_name)
                if not has_file_allowed_extension(path, IMG_EXTENSIONS):
                    continue
                reason = check_image_file(path)
                if reason is None:
                    samples.append((path, index))
                else:
                    bad.append(BadEntry(path, reason))
    return classes, samples, bad


class ImageFiles(Dataset):
    """Checked images in class folders: torchvision's ``ImageFolder`` items, order and attributes.

    Items are ``(transform(RGB PIL image), class index)``; ``classes``, ``class_to_idx``,
    ``samples`` (= ``imgs``) and ``targets`` as in ImageFolder. An image whose header
    passed the build-time check but whose pixels cannot be decoded is, with
    ``on_bad_image="error"``, a ``RecipeError`` naming it (key ``data.params.root``); with
    ``"skip"``, the next sample that reads (in index order, wrapping) takes its place,
    one warning per file goes to stderr, and ``read_failures`` (plus ``counts``, when
    given: the ``DataSplits.info`` entry of the main process) counts it.
    """

    def __init__(
        self,
        root: str,
        classes: list[str],
        samples: list[tuple[str, int]],
        transform: Callable | None,
        on_bad_image: OnBadImage = "error",
        counts: dict[str, int] | None = None,
        split: str = "train",
    ) -> None:
        self.root = root
        self.classes = classes
        self.class_to_idx = {name: i for i, name in enumerate(classes)}
        self.samples = samples
        self.imgs = samples
        self.targets = [t for _, t in samples]
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.read_failures: dict[int, str] = {}
        self._counts = counts
        self._split = split

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if index < 0:
            index += len(self.samples)
        image = None if index in self.read_failures else self._read(index)
        if image is None:
            index, image = self._substitute(index)
        target = self.samples[index][1]
        return (self.transform(image) if self.transform is not None else image), target

    def _read(self, index: int) -> Image.Image | None:
        """The RGB image at ``index``; ``None`` (after reporting it) when it fails and bad images are skipped."""
        path = self.samples[index][0]
        try:
            with open(path, "rb") as f, warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return Image.open(f).convert("RGB")
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for a broken file
            reason = _describe_failure(exc)
        if self.on_bad_image == "error":
            raise RecipeError(f"image '{path}' cannot be read: {reason}; replace or delete it, "
                              "or set on_bad_image: skip to leave unreadable images out", key=ROOT_KEY)
        self.read_failures[index] = reason
        if self._counts is not None:
            self._counts[self._split] = self._counts.get(self._split, 0) + 1
        warn(f"image_folder could not read '{path}' ({reason}); another image takes its place (on_bad_image: skip)")
        return None

    def _substitute(self, index: int) -> tuple[int, Image.Image]:
        n = len(self.samples)
        for step in range(1, n):
            other = (index + step) % n
            if other in self.read_failures:
                continue
            image = self._read(other)
            if image is not None:
                return other, image
        raise RecipeError(f"no image in '{self.root}' can be read (all {n} failed)", key=ROOT_KEY)


def warn(message: str) -> None:
    """A ``kdforge: warning:`` line on stderr, from the first process only (each process builds the data)."""
    if os.environ.get("RANK", "0") in ("", "0"):
        print(f"kdforge: warning: {message}", file=sys.stderr, flush=True)


def load_image_folder(
    path: Path, transform: Any, param: str, on_bad_image: OnBadImage = "error", split: str = "train",
    read_counts: dict[str, int] | None = None,
) -> tuple[ImageFiles, list[BadEntry]]:
    """The checked image folder at ``path`` and the entries left out of it.

    With ``on_bad_image="error"`` any unreadable file or looping folder link is a
    ``RecipeError`` (key ``data.params.root``) naming the first and counting them all; with
    ``"skip"`` they are left out and a warning line says how many. A class folder with no
    readable image is a ``RecipeError`` keyed by ``param`` either way.
    """
    folder = str(path)
    try:
        classes, samples, bad = scan_image_folder(folder)
    except FileNotFoundError as exc:  # no class folders
        raise RecipeError(f"'{path}': {exc}", key=f"data.params.{param}") from None
    if bad and on_bad_image == "error":
        found = (f"{len(bad)} unreadable files in '{folder}' (first: {bad[0]}); replace or delete them" if len(bad) > 1
                 else f"an unreadable file in '{folder}': {bad[0]}; replace or delete it")
        raise RecipeError(f"image_folder found {found}, or set on_bad_image: skip to leave unreadable images out",
                          key=ROOT_KEY)
    if bad:
        warn(f"image_folder skipped {len(bad)} unreadable file{'s' if len(bad) != 1 else ''} in {folder} "
             f"(first: {bad[0]})")
    empty = sorted(set(classes) - {classes[t] for _, t in samples})
    if empty:
        skipped = f" ({len(bad)} unreadable files were skipped)" if bad else ""
        raise RecipeError(f"'{path}': Found no valid file for the classes {', '.join(empty)}{skipped}. "
                          f"Supported extensions are: {', '.join(IMG_EXTENSIONS)}", key=f"data.params.{param}")
    return ImageFiles(folder, classes, samples, transform, on_bad_image, read_counts, split), bad

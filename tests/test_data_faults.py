"""Data faults: doctored CIFAR pickles never run, bad image files are one clear line.

CIFAR files are written here in the release's own format: Python 2 cPickle protocol 2
(byte strings as BINSTRING, arrays through ``numpy.core.multiarray._reconstruct``,
emitted opcode by opcode below), and as a Python 3 copy with bytes keys at protocol 2.
Image folders are tiny PNG/JPEG files in class folders, with one fault each.
Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import signal
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.datasets import CIFAR10, ImageFolder

import kdforge
from conftest import base_recipe
from kdforge import RecipeError
from kdforge.cli import main as cli_main
from kdforge.plugins import datasets as ds
from kdforge.plugins import torchvision_data as tvd


# -- the CIFAR release's pickle format ------------------------------------------------------
def py2_pickle(obj: Any) -> bytes:
    """``obj`` pickled as Python 2's cPickle wrote the CIFAR release (protocol 2).

    str and bytes become Python 2 byte strings (SHORT_BINSTRING / BINSTRING), read back
    as str with ``encoding='latin1'``; uint8 arrays use the globals numpy 1 wrote:
    ``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype``.
    """
    out = bytearray(b"\x80\x02")

    def put(o: Any) -> None:
        if o is None:
            out.extend(b"N")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            out.extend(b"K" + bytes([o]) if 0 <= o < 256 else b"J" + struct.pack("<i", o))
        elif isinstance(o, (str, bytes)):
            raw = o.encode("latin1") if isinstance(o, str) else o
            out.extend(b"U" + bytes([len(raw)]) + raw if len(raw) < 256 else b"T" + struct.pack("<i", len(raw)) + raw)
        elif isinstance(o, tuple):
            out.extend(b"(")
            for item in o:
                put(item)
            out.extend(b"t")
        elif isinstance(o, list):
            out.extend(b"]")
            if o:
                out.extend(b"(")
                for item in o:
                    put(item)
                out.extend(b"e")
        elif isinstance(o, dict):
            out.extend(b"}")
            if o:
                out.extend(b"(")
                for key, value in o.items():
                    put(key)
                    put(value)
                out.extend(b"u")
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n")
            put((0,))
            put("b")
            out.extend(b"tR(")  # _reconstruct(ndarray, (0,), 'b'), then its state
            put(1)
            put(tuple(o.shape))
            out.extend(b"cnumpy\ndtype\n")
            put(("u1", 0, 1))
            out.extend(b"R")
            put((3, "|", None, None, None, -1, -1, 0))
            out.extend(b"b")
            put(False)
            put(o.tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(type(o))

    put(obj)
    out.extend(b".")
    return bytes(out)


def py3_bytes_pickle(obj: dict[str, Any]) -> bytes:
    """A Python 3 copy: bytes keys and byte strings, protocol 2 (bytes go through ``_codecs.encode``)."""
    def to_bytes(o: Any) -> Any:
        if isinstance(o, str):
            return o.encode("latin1")
        if isinstance(o, list):
            return [to_bytes(x) for x in o]
        return o

    return pickle.dumps({k.encode(): to_bytes(v) for k, v in obj.items()}, protocol=2)


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, style: str = "py2", per_batch: int = 4, test_size: int = 6) -> Path:
    """``root/cifar-10-batches-py/`` with the release's files, keys and dtypes; returns the folder."""
    dump = py2_pickle if style == "py2" else py3_bytes_pickle
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for b in range(1, 6):
        (folder / f"data_batch_{b}").write_bytes(dump({
            "batch_label": f"training batch {b} of 5",
            "labels": [(b * per_batch + j) % 10 for j in range(per_batch)],
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "filenames": [f"img_{b}_{j}.png" for j in range(per_batch)],
        }))
    (folder / "test_batch").write_bytes(dump({
        "batch_label": "testing batch 1 of 1",
        "labels": [j % 10 for j in range(test_size)],
        "data": rng.integers(0, 256, (test_size, 3072), dtype=np.uint8),
        "filenames": [f"test_{j}.png" for j in range(test_size)],
    }))
    (folder / "batches.meta").write_bytes(dump({"num_cases_per_batch": per_batch, "label_names": CIFAR10_NAMES,
                                                "num_vis": 3072}))
    return folder


def write_cifar100(root: Path, style: str = "py3-bytes", n: int = 30) -> Path:
    """``root/cifar-100-python/`` (train, test, meta) with the release's keys."""
    dump = py2_pickle if style == "py2" else py3_bytes_pickle
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("train", "test"):
        fine = [(7 * j) % 100 for j in range(n)]
        (folder / name).write_bytes(dump({
            "filenames": [f"{name}_{j}.png" for j in range(n)], "batch_label": f"{name}ing batch 1 of 1",
            "fine_labels": fine, "coarse_labels": [f // 5 for f in fine],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }))
    (folder / "meta").write_bytes(dump({"fine_label_names": [f"fine_{i}" for i in range(100)],
                                        "coarse_label_names": [f"coarse_{i}" for i in range(20)]}))
    return folder


class _TorchvisionCIFAR10(CIFAR10):
    """torchvision's own loader with the md5 checks off, as the reference for item order (benign files only)."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class Payload:
    """Unpickling this runs ``action(*args)``: what a doctored CIFAR file would carry."""

    def __init__(self, action: Callable, *args: Any) -> None:
        self.action, self.args = action, args

    def __reduce__(self) -> tuple:
        return self.action, self.args


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected download: {args}")

    monkeypatch.setattr(tvd, "download_and_extract_archive", refuse)


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """``kdforge ARGS`` in this process (the CLI's own error handling); exit code and stderr."""
    capsys.readouterr()
    code = cli_main(list(args))
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *expected: str) -> str:
    """Exit code 2, exactly one stderr line, no traceback, keyed by data.params.root, holding ``expected``."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("kdforge: error: data.params.root: "), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def write_recipe(tmp_path: Path, data: dict, **trainer: Any) -> Path:
    recipe = base_recipe(tmp_path, data=data, student={"name": "mlp", "params": {"hidden": [8]}},
                         trainer={"epochs": 1, "batch_size": 4, "progress_bar": False, **trainer})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# -- CIFAR: the real format still loads ----------------------------------------------------
def test_restricted_unpickler_reads_the_release_format_as_plain_pickle_does(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path, "py2")
    path = folder / "data_batch_2"
    assert path.read_bytes()[:2] == b"\x80\x02"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 on numpy.core
        plain = pickle.loads(path.read_bytes(), encoding="latin1")  # torchvision's read, benign file
    safe = tvd.read_cifar_pickle(str(path), "CIFAR-10")
    assert set(safe) == set(plain) == {"batch_label", "labels", "data", "filenames"}
    assert safe["data"].dtype == np.uint8 and safe["data"].shape == (4, 3072)
    assert np.array_equal(safe["data"], plain["data"])
    assert safe["labels"] == plain["labels"] and safe["filenames"] == plain["filenames"]


def test_restricted_unpickler_reads_a_python3_copy_with_bytes_keys(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path, "py3-bytes")
    raw = (folder / "data_batch_1").read_bytes()
    assert b"_codecs\nencode" in raw and b"numpy._core.multiarray\n_reconstruct" in raw
    entry = tvd.read_cifar_pickle(str(folder / "data_batch_1"), "CIFAR-10")
    assert entry["batch_label"] == b"training batch 1 of 5"
    assert entry["data"].shape == (4, 3072) and entry["labels"] == [4, 5, 6, 7]


def test_cifar10_items_match_torchvision_in_order(tmp_path: Path, no_download: None) -> None:
    write_cifar10(tmp_path, "py2")
    ours = ds.cifar10(root=str(tmp_path), augment=False, verify=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        reference = _TorchvisionCIFAR10(str(tmp_path), train=True, transform=ours.train.transform)
    assert ours.train.classes == reference.classes == CIFAR10_NAMES
    assert ours.train.targets == reference.targets
    for i in (0, 5, 19):
        x, y = ours.train[i]
        rx, ry = reference[i]
        assert torch.equal(x, rx) and y == ry
    assert len(ours.eval) == 6


def test_cifar100_python3_copy_loads(tmp_path: Path, no_download: None) -> None:
    write_cifar100(tmp_path)
    splits = ds.cifar100(root=str(tmp_path), verify=False)
    assert splits.num_classes == 100 and len(splits.train) == 30
    assert splits.train.classes[3] == "fine_3" and splits.train.targets[:3] == [0, 7, 14]
    assert splits.eval[2][0].shape == (3, 32, 32)


def test_kdforge_trains_on_release_format_files_without_verify(tmp_path: Path, no_download: None) -> None:
    write_cifar10(tmp_path / "data", "py2")
    recipe = base_recipe(tmp_path, data={"name": "cifar10", "params": {"root": str(tmp_path / "data"),
                                                                         "verify": False, "augment": False}},
                         student={"name": "mlp", "params": {"hidden": [8]}},
                         trainer={"epochs": 1, "batch_size": 8, "progress_bar": False})
    summary = kdforge.run(recipe, overwrite=True)
    assert summary["train/steps"] == 3 and summary["student/accuracy"] is not None


# -- CIFAR: a payload never runs --------------------------------------------------------------
PAYLOAD_FILES = ["data_batch_3", "batches.meta", "test_batch"]


def _plant_payload(folder: Path, name: str, marker: Path, style: str = "py3-bytes") -> None:
    """Rewrite ``folder/name`` as a real-looking batch whose ``batch_label`` creates ``marker`` when unpickled."""
    rng = np.random.default_rng(2)
    entry = {"batch_label": Payload(os.system, f"touch {marker}"), "labels": [1, 2], "filenames": [b"a", b"b"],
             "data": rng.integers(0, 256, (2, 3072), dtype=np.uint8)}
    if name == "batches.meta":
        entry = {"label_names": CIFAR10_NAMES, "num_vis": Payload(os.system, f"touch {marker}")}
    (folder / name).write_bytes(pickle.dumps(entry, protocol=2))


@pytest.mark.parametrize("name", PAYLOAD_FILES)
def test_cifar_payload_does_not_run_without_verify(tmp_path: Path, no_download: None, name: str) -> None:
    folder = write_cifar10(tmp_path, "py2")
    marker = tmp_path / "PWNED"
    _plant_payload(folder, name, marker)
    with pytest.raises(RecipeError) as info:
        ds.cifar10(root=str(tmp_path), verify=False)
    assert not marker.exists()
    assert info.value.key == "data.params.root"
    message = str(info.value)
    assert f"'{folder / name}' is not a real CIFAR-10 file: its pickle would call {os.system.__module__}.system" in message
    assert "\n" not in message and "kdforge did not load it" in message


def test_cifar_payload_through_the_cli_with_and_without_verify(
    tmp_path: Path, no_download: None, capsys: pytest.CaptureFixture
) -> None:
    folder = write_cifar10(tmp_path / "data", "py2")
    marker = tmp_path / "PWNED"
    _plant_payload(folder, "data_batch_3", marker)
    for verify, expected in ((False, ["data_batch_3", "is not a real CIFAR-10 file"]),
                             (True, ["does not match the official release", "data_batch_3"])):
        recipe = write_recipe(tmp_path, {"name": "cifar10", "params": {"root": str(tmp_path / "data"),
                                                                        "verify": verify}})
        code, err = cli(capsys, "validate", str(recipe), "--dry-run")
        assert_one_line_error(code, err, *expected)
        assert not marker.exists()


@pytest.mark.parametrize("payload, refused", [
    (b"c__builtin__\neval\n(S'open(\"MARKER\", \"w\")'\ntR.", "__builtin__.eval"),  # a Python 2 style eval
    (b"cbuiltins\nexec\n(X\x1b\x00\x00\x00open('MARKER', 'w').close()tR.", "builtins.exec"),
    (b"csubprocess\ncall\n(]X\x05\x00\x00\x00touchaX\x06\x00\x00\x00MARKERatR.", "subprocess.call"),
])
def test_cifar_other_globals_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payload: bytes,
                                         refused: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "batch").write_bytes(b"\x80\x02" + payload)
    with pytest.raises(RecipeError, match=f"would call {refused},"):
        tvd.read_cifar_pickle(str(tmp_path / "batch"), "CIFAR-10")
    assert not (tmp_path / "MARKER").exists()


def test_cifar_object_arrays_are_refused_before_their_items(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    doctored = {b"data": np.array([Payload(os.system, f"touch {marker}")], dtype=object), b"labels": [0]}
    (tmp_path / "batch").write_bytes(pickle.dumps(doctored, protocol=2))
    with pytest.raises(RecipeError, match="not a real CIFAR-10 file: it cannot be read as a CIFAR-10 pickle "
                                          r"\(UnpicklingError: array dtype 'O8', not a numeric one\)"):
        tvd.read_cifar_pickle(str(tmp_path / "batch"), "CIFAR-10")
    assert not marker.exists()


@pytest.mark.parametrize("content, expected", [
    (os.urandom(64), "cannot be read as a CIFAR-10 pickle"),
    (pickle.dumps([1, 2, 3], protocol=2), "it holds a list, not a dict"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.int64), "labels": [0, 1]}, protocol=2),
     "its 'data' is an int64 array of shape (2, 3072), not uint8 rows"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 12]}, protocol=2),
     "label 12 of image 1 is outside 0..9"),
    (pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}, protocol=2), "no list of 2 'labels'"),
], ids=["random-bytes", "a-list", "int64-data", "label-out-of-range", "no-labels"])
def test_cifar_files_in_another_shape_are_one_clear_error(tmp_path: Path, no_download: None, content: bytes,
                                                          expected: str) -> None:
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_5").write_bytes(content)
    with pytest.raises(RecipeError) as info:
        ds.cifar10(root=str(tmp_path), verify=False)
    assert info.value.key == "data.params.root"
    assert f"'{folder / 'data_batch_5'}' is not a real CIFAR-10 file" in str(info.value)
    assert expected in str(info.value)


# -- image files with faults ------------------------------------------------------------------
def png_bytes(width: int, height: int, rows: bytes, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG written chunk by chunk (for sizes PIL would take long to encode)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b"")


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def truncated_png() -> bytes:
    return encoded(noise_image((24, 24), 1), "PNG")[:-300]


def truncated_jpeg() -> bytes:
    whole = encoded(noise_image((64, 64), 2), "JPEG")
    cut = whole[: int(len(whole) * 0.7)]
    Image.open(io.BytesIO(cut))  # the header is intact: only the pixels are missing
    return cut


def bomb_png() -> bytes:
    """20000 x 10000 one-bit pixels (200 M, above twice PIL's default limit) in 24 KB."""
    return png_bytes(20000, 10000, bytes(10000 * (1 + 2500)), bit_depth=1, color_type=0)


def corrupt_pixels_png() -> bytes:
    """Header and IEND intact, the same length, but the compressed pixels garbled: only decoding finds it."""
    data = bytearray(encoded(noise_image((32, 32), 3), "PNG"))
    start = data.index(b"IDAT") + 40
    data[start:start + 64] = bytes(255 - b for b in data[start:start + 64])
    return bytes(data)


def write_images(root: Path, split: str = "train", classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 5) -> None:
    """Small good PNGs (and one JPEG per class) in ``root/split/<class>/``: 1.png, 2.png, ..., <per_class>.jpg."""
    for c, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (10 + i, 9 + c), (40 * c, 30 * i, 200))
            image.save(folder / (f"{i + 1}.jpg" if i == per_class - 1 else f"{i + 1}.png"))


def image_data(root: Path, **params: Any) -> dict:
    return {"name": "image_folder", "params": {"root": str(root), "image_size": 8, **params}}


# case -> (file name in train/cat, writer): "first" names sort before 1.png, "middle" ones between the files.
BAD_FILES: dict[str, tuple[str, Callable[[Path], None]]] = {
    "corrupt": ("2a.png", lambda p: p.write_bytes(os.urandom(500))),
    "zero-byte": ("0.png", lambda p: p.write_bytes(b"")),
    "truncated PNG first": ("0.png", lambda p: p.write_bytes(truncated_png())),
    "truncated PNG middle": ("2a.png", lambda p: p.write_bytes(truncated_png())),
    "truncated JPEG first": ("0.jpg", lambda p: p.write_bytes(truncated_jpeg())),
    "truncated JPEG middle": ("2a.jpeg", lambda p: p.write_bytes(truncated_jpeg())),
    "decompression bomb": ("2a.png", lambda p: p.write_bytes(bomb_png())),
    "dangling symlink": ("2a.png", lambda p: p.symlink_to(p.parent / "gone.png")),
}
EXPECTED_REASON = {
    "corrupt": "not an image PIL can read",
    "zero-byte": "empty file (0 bytes)",
    "truncated PNG first": "truncated",
    "truncated PNG middle": "truncated",
    "truncated JPEG first": "truncated",
    "truncated JPEG middle": "truncated",
    "decompression bomb": "it has 200,000,000 pixels, above the decompression-bomb limit 178,956,970 "
                          "(2 x PIL.Image.MAX_IMAGE_PIXELS)",
    "dangling symlink": "dangling symlink",
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_image_is_one_line_at_validate(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    write_images(tmp_path)
    name, write = BAD_FILES[case]
    bad = tmp_path / "train" / "cat" / name
    write(bad)
    code, err = cli(capsys, "validate", str(write_recipe(tmp_path, image_data(tmp_path))), "--dry-run")
    line = assert_one_line_error(code, err, f"'{tmp_path / 'train'}'", str(bad), EXPECTED_REASON[case],
                                 "or set on_bad_image: skip")
    assert "image_folder found an unreadable file" in line


def test_every_bad_file_is_counted_and_the_first_named(tmp_path: Path) -> None:
    write_images(tmp_path)
    for case in ("zero-byte", "corrupt", "dangling symlink"):
        name, write = BAD_FILES[case]
        write(tmp_path / "train" / ("dog" if case == "corrupt" else "cat") / name)
    with pytest.raises(RecipeError) as info:
        ds.image_folder(root=str(tmp_path), image_size=8)
    assert info.value.key == "data.params.root"
    assert (f"image_folder found 3 unreadable files in '{tmp_path / 'train'}' (first: {tmp_path}/train/cat/0.png: "
            "empty file (0 bytes)); replace or delete them, or set on_bad_image: skip") in str(info.value)


class Hung(Exception):
    """Raised by ``deadline``; not an OSError, which ``os.walk`` would swallow."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise ``Hung`` in this (main) thread after ``seconds``, and every second after: a hanging walk fails
    the test instead of the suite."""
    def expire(signum: int, frame: Any) -> None:
        raise Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_symlink_loops_end_and_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_images(tmp_path)
    cat = tmp_path / "train" / "cat"
    (cat / "here").symlink_to(".")
    (cat / "up").symlink_to("..")
    (cat / "deeper").mkdir()
    (cat / "deeper" / "back").symlink_to("../..")
    with deadline(60):  # the walk used to branch without end
        code, err = cli(capsys, "validate", str(write_recipe(tmp_path, image_data(tmp_path))), "--dry-run")
    assert_one_line_error(code, err, f"found 3 unreadable files in '{tmp_path / 'train'}'",
                          f"(first: {cat / 'here'}: symlink to '{os.path.realpath(cat)}', a folder already read "
                          "(a symlink loop or a second link to the same folder))")


def test_symlink_loops_are_skipped_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_images(tmp_path)
    cat = tmp_path / "train" / "cat"
    (cat / "here").symlink_to(".")
    (cat / "up").symlink_to("..")
    splits = ds.image_folder(root=str(tmp_path), image_size=8, on_bad_image="skip")
    assert len(splits.train) == 10 and splits.info["skipped_files"] == {"train": 2, "eval": 0}
    assert f"kdforge: warning: image_folder skipped 2 unreadable files in {tmp_path / 'train'} " in capsys.readouterr().err


def test_folder_links_outside_are_followed_once(tmp_path: Path) -> None:
    write_images(tmp_path)
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    Image.new("RGB", (9, 9)).save(extra / "x.png")
    (tmp_path / "train" / "cat" / "more").symlink_to(extra)
    splits = ds.image_folder(root=str(tmp_path), image_size=8)
    assert str(tmp_path / "train" / "cat" / "more" / "x.png") in [p for p, _ in splits.train.samples]
    (tmp_path / "train" / "dog" / "more").symlink_to(extra)  # the same folder under a second class
    with pytest.raises(RecipeError, match=re.escape(f"{tmp_path}/train/dog/more: symlink to '{extra}', a folder already")):
        ds.image_folder(root=str(tmp_path), image_size=8)


def test_class_folder_linking_to_another_is_an_error(tmp_path: Path) -> None:
    write_images(tmp_path)
    (tmp_path / "train" / "kitty").symlink_to("cat")
    with pytest.raises(RecipeError, match="class folder '.*/train/kitty' is a link to class folder 'cat'"):
        ds.image_folder(root=str(tmp_path), image_size=8, on_bad_image="skip")


def test_good_folders_keep_imagefolder_classes_order_and_pixels(tmp_path: Path) -> None:
    write_images(tmp_path, classes=("b", "a", "c"))
    nested = tmp_path / "train" / "a" / "sub" / "deeper"
    nested.mkdir(parents=True)
    for name in ("z.png", "a.PNG", "notes.txt"):
        Image.new("RGB", (11, 11), (1, 2, 3)).save(nested / name, format="PNG")
    (tmp_path / "train" / "a" / "0b.png").symlink_to(tmp_path / "train" / "c" / "1.png")  # file links are kept
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.new("RGB", (12, 12)).save(outside / "o.bmp")
    (tmp_path / "train" / "c" / "link").symlink_to(outside)
    splits = ds.image_folder(root=str(tmp_path), image_size=8, augment=False)
    reference = ImageFolder(str(tmp_path / "train"), transform=splits.train.transform)
    assert splits.train.classes == reference.classes == ["a", "b", "c"]
    assert splits.train.samples == reference.samples and splits.train.targets == reference.targets
    assert splits.info["skipped_files"] == {"train": 0, "eval": 0}
    for i in (0, 3, len(reference) - 1):
        assert torch.equal(splits.train[i][0], reference[i][0]) and splits.train[i][1] == reference[i][1]


def test_skip_trains_with_bad_files_left_out_and_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_images(tmp_path)
    write_images(tmp_path, "val", per_class=2)
    for case in ("zero-byte", "truncated PNG middle", "decompression bomb"):
        name, write = BAD_FILES[case]
        write(tmp_path / "train" / "cat" / name.replace("2a", "2" + case[0]))
    BAD_FILES["corrupt"][1](tmp_path / "val" / "dog" / "x.png")
    recipe = base_recipe(tmp_path, data=image_data(tmp_path, on_bad_image="skip"),
                         student={"name": "mlp", "params": {"hidden": [8]}},
                         trainer={"epochs": 1, "batch_size": 4, "progress_bar": False})
    capsys.readouterr()
    summary = kdforge.run(recipe, overwrite=True)
    err = capsys.readouterr().err
    assert f"kdforge: warning: image_folder skipped 3 unreadable files in {tmp_path / 'train'} (first: " \
           f"{tmp_path / 'train' / 'cat' / '0.png'}: empty file (0 bytes))" in err
    assert f"kdforge: warning: image_folder skipped 1 unreadable file in {tmp_path / 'val'}" in err
    assert summary["train/steps"] == 3  # 10 good training images, batches of 4
    assert summary["data/skipped_files"] == {"train": 3, "eval": 1}
    assert len(summary["data/skipped_examples"]["train"]) == 3
    assert summary["data/skipped_examples"]["eval"][0].startswith(f"{tmp_path / 'val' / 'dog' / 'x.png'}: not an image")
    assert summary["data/skipped_at_read"] == {"train": 0, "eval": 0}


def test_pixels_that_fail_to_decode_are_one_line_mid_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_images(tmp_path, per_class=6)
    bad = tmp_path / "train" / "dog" / "3a.png"  # not in the dry run's first batch
    bad.write_bytes(corrupt_pixels_png())
    assert tvd.check_image_file(str(bad)) is None  # the header check cannot see it
    code, err = cli(capsys, "run", str(write_recipe(tmp_path, image_data(tmp_path), epochs=1)))
    assert_one_line_error(code, err, f"image '{bad}' cannot be read: OSError: broken data stream",
                          "or set on_bad_image: skip")


def test_pixels_that_fail_to_decode_in_a_worker_process_are_one_line_too(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    # torch re-raises a worker's error with the worker's whole traceback as its message
    write_images(tmp_path, per_class=6)
    bad = tmp_path / "train" / "dog" / "3a.png"
    bad.write_bytes(corrupt_pixels_png())
    code, err = cli(capsys, "run", str(write_recipe(tmp_path, image_data(tmp_path), epochs=1, num_workers=1)))
    line = assert_one_line_error(code, err, f"image '{bad}' cannot be read: OSError: broken data stream")
    assert "Caught" not in line and "worker" not in line


def test_pixels_that_fail_to_decode_are_replaced_when_skipping(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_images(tmp_path, per_class=6)
    bad = tmp_path / "train" / "dog" / "3a.png"
    bad.write_bytes(corrupt_pixels_png())
    splits = ds.image_folder(root=str(tmp_path), image_size=8, on_bad_image="skip")
    index = [p for p, _ in splits.train.samples].index(str(bad))
    capsys.readouterr()
    x, y = splits.train[index]
    # (solid-colour images: any crop of one is the same picture, up to the resize's rounding)
    assert torch.allclose(x, splits.train[index + 1][0], atol=1e-5) and y == splits.train.targets[index + 1]
    splits.train[index]  # known now: no second warning
    err = capsys.readouterr().err
    assert err.count("kdforge: warning: image_folder could not read") == 1 and str(bad) in err
    assert splits.info["skipped_at_read"] == {"train": 1, "eval": 0}


def test_on_bad_image_takes_error_or_skip(tmp_path: Path) -> None:
    write_images(tmp_path)
    assert len(kdforge.create("dataset", "image_folder", root=str(tmp_path), on_bad_image="skip").train) == 10
    with pytest.raises(RecipeError, match="on_bad_image.*'error' or 'skip'"):
        kdforge.create("dataset", "image_folder", root=str(tmp_path), on_bad_image="ignore")

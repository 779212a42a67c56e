"""``kdforge report``: real PNG figures of the expected pixel size, a page that links only to files that exist."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest

import kdforge
from conftest import base_recipe, run_cli
from kdforge import RecipeError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (checking the signature and the chunk type)."""
    data = path.read_bytes()[:24]
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def expected_pixels(panels: int) -> tuple[int, int]:
    """600 x 400 px per panel, two columns at most, a 60 px legend strip below."""
    columns = min(panels, 2)
    return columns * 600, math.ceil(panels / columns) * 400 + 60


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny teacher, and a student distilled from it with a cosine lr and a scheduled temperature."""
    root = tmp_path_factory.mktemp("report-runs")
    teacher = root / "teacher"
    kdforge.run(base_recipe(root, name="tiny-teacher", student={"name": "small_cnn", "params": {"channels": [8, 16]}},
                            output_dir=str(teacher)))
    kd = root / "kd"
    kdforge.run(base_recipe(
        root, name="tiny-kd", teacher={"name": "checkpoint", "params": {"path": str(teacher)}},
        student={"name": "mlp", "params": {"hidden": [16]}},
        losses=[{"name": "ce", "weight": 0.5},
                {"name": "kd", "weight": {"schedule": "linear", "params": {"start": 0.2, "end": 0.8}},
                 "params": {"temperature": {"schedule": "linear", "params": {"start": 8.0, "end": 2.0}}}}],
        optimizer={"name": "adam", "params": {"lr": {"schedule": "cosine", "params": {"start": 0.01}}}},
        trainer={"epochs": 2, "batch_size": 128, "progress_bar": False, "log_every": 2},
        output_dir=str(kd)))
    return {"teacher": teacher, "kd": kd}


def report(*argv: str) -> int:
    from kdforge import report as command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return command.run(parser.parse_args(list(argv)))


class Links(HTMLParser):
    """Every href/src of a page, and the tags it uses."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.tags: set[str] = set()
        self.images: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.links.append(value)
        if tag == "img":
            self.images.append(dict(attrs))


def test_two_runs_give_real_pngs_of_the_expected_size_and_a_page_linking_only_existing_files(
        runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert report(str(runs["teacher"]), str(runs["kd"]), "--out", str(out), "--repeats", "2") == 0
    assert str(out / "index.html") in capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())
    figures = {f["file"]: f for f in data["figures"]}
    assert set(figures) == {"losses.png", "schedules.png", "metrics.png", "tradeoff.png"}
    # losses: the total, ce and kd; schedules: lr, the kd weight, the kd temperature, throughput
    assert figures["losses.png"]["panels"] == ["total loss (weighted sum of the terms)", "ce loss (unweighted)",
                                               "kd loss (unweighted)"]
    assert figures["schedules.png"]["panels"] == ["learning rate (first parameter group)", "weight of the kd term",
                                                  "kd: temperature", "training throughput (all processes)"]
    assert figures["metrics.png"]["panels"] == ["top-1 accuracy on the eval split", "top-5 accuracy on the eval split"]
    for name, panels in (("losses.png", 3), ("schedules.png", 4), ("metrics.png", 2)):
        assert png_size(out / name) == expected_pixels(panels) == (figures[name]["width"], figures[name]["height"])
    assert png_size(out / "tradeoff.png") == (600, 460)

    from PIL import Image

    for name in figures:  # drawn, not blank: many colors, and the run colors among them
        with Image.open(out / name) as image:
            image.load()
            colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert len(colors) > 50, name

    page = (out / "index.html").read_text()
    parser = Links()
    parser.feed(page)
    assert parser.links, "the page links its figures"
    for link in parser.links:
        assert "://" not in link and not link.startswith(("/", "data:", "#")), link
        assert (out / link).is_file(), f"the page links {link!r}, which does not exist"
    assert {Path(i["src"]).name for i in parser.images} == set(figures)
    for image in parser.images:
        assert (int(image["width"]), int(image["height"])) == png_size(out / image["src"])
    assert "script" not in parser.tags and "link" not in parser.tags  # self-contained: inline CSS, no script
    assert "<style>" in page
    # the comparison table and the compression report
    assert "tiny-teacher" in page and "tiny-kd" in page
    assert "teacher / student" in page and "x smaller" in page
    kd_compression = data["compression"][1]
    assert [m["role"] for m in kd_compression["models"]] == ["teacher", "student"]
    assert data["compression"][0]["ratios"] == {}  # the teacher's own run has no teacher


def test_one_run_writes_into_its_own_report_folder_and_overwrites_only_its_figures(
        runs: dict[str, Path], tmp_path: Path) -> None:
    run_dir = tmp_path / "kd"
    shutil.copytree(runs["kd"], run_dir)
    (run_dir / "report").mkdir()
    (run_dir / "report" / "mine.png").write_bytes(b"not ours")
    (run_dir / "report" / "tradeoff.png").write_bytes(b"an earlier report's figure")
    assert report(str(run_dir), "--no-profile") == 0
    out = run_dir / "report"
    assert (out / "mine.png").read_bytes() == b"not ours"
    assert not (out / "tradeoff.png").exists()  # one run: no trade-off figure, the stale one is gone
    assert {p.name for p in out.glob("*.png")} == {"mine.png", "losses.png", "schedules.png", "metrics.png"}
    data = json.loads((out / "report.json").read_text())
    assert data["compression"] == [None]
    assert "Compression" not in (out / "index.html").read_text()


def test_a_run_still_training_is_plotted_without_a_compression_report(runs: dict[str, Path], tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(runs["kd"] / "recipe.yaml", partial)
    lines = (runs["kd"] / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text("\n".join(lines[: len(lines) // 2]) + '\n{"step": 9, "trunc')
    out = tmp_path / "out"
    assert report(str(partial), "--out", str(out)) == 0
    page = (out / "index.html").read_text()
    assert "(unfinished)" in page and "not profiled (the run has not finished)" in page
    assert png_size(out / "losses.png")[0] == 1200


def test_errors_are_one_line_recipe_errors(runs: dict[str, Path], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RecipeError, match="no run directory"):
        report(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match="not a kdforge run directory"):
        report(str(tmp_path / "empty"))
    with pytest.raises(RecipeError, match="given twice"):
        report(str(runs["kd"]), str(runs["kd"]) + "/", "--out", str(tmp_path / "x"))
    (tmp_path / "file").write_text("")
    with pytest.raises(RecipeError, match="is a file"):
        report(str(runs["kd"]), "--out", str(tmp_path / "file"))
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(RecipeError, match=r"pip install 'kdforge\[report\]'"):
        report(str(runs["kd"]), "--out", str(tmp_path / "y"))


def test_cli_report(runs: dict[str, Path], tmp_path: Path) -> None:
    """Needs the lead's wiring: ``kdforge report`` as a subcommand."""
    out = tmp_path / "cli"
    result = run_cli("report", str(runs["teacher"]), str(runs["kd"]), "--out", str(out), "--repeats", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "index.html").is_file() and png_size(out / "metrics.png") == expected_pixels(2)
    missing = run_cli("report", str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "no run directory" in missing.stderr

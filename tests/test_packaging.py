"""The built wheel holds the engine, the built-in plugins and their entry points."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_wheel_contents_import_and_register(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("kdforge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("kdforge/__init__.py", "kdforge/loop.py", "kdforge/plugins/losses.py", "kdforge/plugins/datasets.py"):
        assert module in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[kdforge]" in text and "kdforge.plugins.losses" in text and "[console_scripts]" in text
    # Unpack the wheel alone on sys.path (ahead of the editable install) and use it.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    code = ("import json, kdforge; "
            "print(json.dumps([kdforge.__file__, sorted({(r.kind, r.name, r.status) for r in kdforge.list_plugins()})]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(target), "KDFORGE_LOAD_PLUGINS": ""}, cwd=tmp_path)
    location, plugins = json.loads(out.stdout)
    assert location.startswith(str(target))
    assert ["loss", "kd", "ok"] in plugins and ["dataset", "digits", "ok"] in plugins
    assert all(status == "ok" for _, _, status in plugins)

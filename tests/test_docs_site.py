"""The documentation site builds strictly, lists every page, and documents every public name.

One test builds the real site (mkdocs.yml at the repository root) with ``mkdocs build --strict``
and reads the API page; a second, tiny site checks that the strictness settings do turn a
broken link, a missing anchor and a page left out of the nav into a failed build. The other
tests read the sources only.
"""

from __future__ import annotations

import html
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT

pytest.importorskip("mkdocs")
pytest.importorskip("mkdocstrings_handlers.python")
pytest.importorskip("material")

import kdforge  # noqa: E402

DOCS = ROOT / "docs"
API_PAGE = DOCS / "api.md"
DIRECTIVE = re.compile(r"^:::\s+(kdforge(?:\.[A-Za-z_][A-Za-z0-9_]*)+)\s*$", re.MULTILINE)


def mkdocs_command() -> list[str]:
    """The ``mkdocs`` console script beside this Python (as ``make docs`` runs it), else ``python -m mkdocs``."""
    script = Path(sys.executable).parent / "mkdocs"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mkdocs"]


def build(config: Path, site_dir: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` of ``config`` into ``site_dir``; output captured as text."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([*mkdocs_command(), "build", "--strict", "--config-file", str(config), "--site-dir",
                           str(site_dir)], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def page_text(path: Path) -> str:
    """The visible text of an HTML page, to search in: tags dropped, entities decoded, no whitespace."""
    text = re.sub(r"<[^>]+>", " ", path.read_text(encoding="utf-8"))
    return "".join(html.unescape(text).split())


def doc_text(line: str) -> str:
    """A docstring line as ``page_text`` finds it once rendered: no code markup (``x``, `x`), no whitespace."""
    return "".join(line.replace("``", "").replace("`", "").split())


def nav_files(nav: Any) -> list[str]:
    """Every page file of a (nested) mkdocs nav, in order."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in nav_files(value)]
    return []


def api_directives() -> list[str]:
    """The object paths of the ``::: kdforge....`` lines of docs/api.md."""
    return DIRECTIVE.findall(API_PAGE.read_text(encoding="utf-8"))


def test_the_site_builds_strictly_and_the_api_page_renders_every_entry(tmp_path: Path) -> None:
    """One build of the real site (the slow part: a single test, so that test workers do not each build it)."""
    done = build(ROOT / "mkdocs.yml", tmp_path / "site", ROOT)
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    assert not re.search(r"^(WARNING|ERROR)\b", log, re.MULTILINE), log
    assert "not included in the" not in log, log
    out = tmp_path / "site"
    for page in ("index.html", "api/index.html", "report/index.html", "export/index.html", "sweep/index.html",
                 "plugins/losses/index.html"):
        assert (out / page).is_file(), page
    page = out / "api" / "index.html"
    source = page.read_text(encoding="utf-8")
    for path in api_directives():
        assert f'id="{path}"' in source, f"{path} has no entry on the rendered API page"
    text = page_text(page)
    for name in ("Task", "run", "validate", "RecipeError", "build_teacher", "Batch", "StepOutputs", "ExtraModel",
                 "Callback", "load_student", "ReplayableDataset"):
        doc = inspect.getdoc(getattr(kdforge, name))
        assert doc, f"kdforge.{name} has no docstring"
        first = doc_text(doc.splitlines()[0])
        assert first in text, f"the first docstring line of kdforge.{name} is not on the API page: {first!r}"


def test_every_page_is_in_the_nav_and_the_index_links_the_tool_pages() -> None:
    from mkdocs.utils.yaml import yaml_load

    with open(ROOT / "mkdocs.yml", encoding="utf-8") as fh:
        config = yaml_load(fh)
    listed = nav_files(config["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in [*DOCS.glob("*.md"), *DOCS.glob("plugins/*.md")])
    missing = [p for p in pages if p not in listed]
    assert not missing, f"pages missing from the nav in mkdocs.yml: {missing}"
    assert not [f for f in listed if not (DOCS / f).is_file()], "the nav names a page that does not exist"
    assert len(listed) == len(set(listed)), "a page is in the nav twice"
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for page in ("report.md", "export.md", "sweep.md", "api.md"):
        assert f"]({page}" in index, f"docs/index.md does not link {page}"


def test_every_public_name_has_an_entry_on_the_api_page() -> None:
    paths = api_directives()
    assert len(paths) == len(set(paths)), "a name is documented twice on docs/api.md"
    documented = {p.rsplit(".", 1)[1]: p for p in paths}
    public = [n for n in kdforge.__all__ if n != "__version__"]
    missing = [n for n in public if n not in documented]
    assert not missing, f"public names without a `::: kdforge....<name>` entry in docs/api.md: {missing}"
    for name in public:  # each entry points at the module that defines the name (as kdforge imports it)
        module = documented[name].rsplit(".", 1)[0]
        defining = "kdforge" + kdforge._EXPORTS[name] if name in kdforge._EXPORTS else "kdforge"
        assert module == defining, f"docs/api.md documents {name} as {documented[name]}, defined in {defining}"


def test_strictness_turns_broken_links_anchors_and_unlisted_pages_into_errors(tmp_path: Path) -> None:
    from mkdocs.utils.yaml import yaml_load

    with open(ROOT / "mkdocs.yml", encoding="utf-8") as fh:
        validation = yaml_load(fh)["validation"]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\n[there](other.md#no-such-heading), [a file](../outside.yaml)\n")
    (docs / "other.md").write_text("# Other\n\n## A heading\n")
    (docs / "forgotten.md").write_text("# Forgotten\n")
    config = tmp_path / "mkdocs.yml"
    import yaml

    config.write_text(yaml.safe_dump({"site_name": "t", "docs_dir": "docs", "theme": {"name": "mkdocs"},
                                      "nav": ["index.md", "other.md"], "validation": validation}))
    done = build(config, tmp_path / "site", tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode != 0, log
    assert "no-such-heading" in log and "outside.yaml" in log and "forgotten.md" in log, log

"""MkDocs hooks of the documentation site (``hooks:`` in mkdocs.yml).

griffe (mkdocstrings' Python reader) looks for ``kdforge`` on ``sys.path`` before it imports
anything. When mkdocs runs as ``.venv/bin/mkdocs``, that folder is on ``sys.path`` and holds
the ``kdforge`` console script, a file that griffe takes for a namespace package, so none of
kdforge's names are found. Those entries are dropped here; griffe then asks the import system,
which knows that the package ``kdforge`` is this repository's ``core/`` (pyproject's
``[tool.setuptools.package-dir]``), and reads the source files from there.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def on_startup(**_: Any) -> None:
    """Remove ``sys.path`` folders in which ``kdforge`` is a file rather than a package."""
    sys.path[:] = [p for p in sys.path if not (p and (Path(p) / "kdforge").is_file())]

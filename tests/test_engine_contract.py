"""The engine's own rules, checked on its source: plugins use only public names, core/ names
no distillation method and no private Accelerate state, every extension point is documented."""

from __future__ import annotations

import ast
import inspect
import io
import re
import tokenize
from pathlib import Path

import kdforge
from kdforge import extensions

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = set(kdforge.__all__)


def _private_uses(path: Path) -> list[str]:
    """kdforge names a module uses that a third-party package could not (not in kdforge.__all__)."""
    found = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            # inside kdforge.plugins: "from . import x" stays among the plugins; "from .." reaches the engine
            if node.level > 1:
                found.append(f"{path.name}:{node.lineno}: from {'.' * node.level}{node.module or ''} import ...")
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "kdforge":
            module = node.module or ""
            if module.startswith("kdforge.plugins"):
                continue  # a sibling built-in plugin module
            for alias in node.names:
                if module != "kdforge" or alias.name not in PUBLIC:
                    found.append(f"{path.name}:{node.lineno}: from {module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("kdforge.") and not alias.name.startswith("kdforge.plugins"):
                    found.append(f"{path.name}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "kdforge":
            if node.attr not in PUBLIC and node.attr != "plugins":
                found.append(f"{path.name}:{node.lineno}: kdforge.{node.attr}")
    return found


def test_built_in_plugins_use_only_public_kdforge_names() -> None:
    uses = [use for path in sorted((ROOT / "plugins").glob("*.py")) for use in _private_uses(path)]
    assert uses == []


def test_the_import_check_catches_a_private_import(tmp_path: Path) -> None:
    sneaky = tmp_path / "sneaky.py"
    sneaky.write_text("from kdforge.registry import get_registry\nimport kdforge.weights\n"
                      "from kdforge import create, _private\nimport kdforge\nkdforge.build.build_run\n"
                      "from ..registry import get_registry\nfrom . import losses\n")
    assert len(_private_uses(sneaky)) == 5


#: words that name a distillation method or a method-specific capability ("exit" alone is a process exit code)
METHOD_WORDS = {"ensemble", "ensembles", "ema", "byot", "exits", "fitnet", "hinton", "attention", "relational",
                "born", "kd", "dkd", "crd", "early", "mkd", "distiller"}


def _code_words(path: Path) -> list[tuple[int, str]]:
    """Identifier parts and words of non-docstring strings in a module (comments and docstrings left out)."""
    source = path.read_text(encoding="utf-8")
    doc_lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)) and node.body \
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
            doc_lines |= set(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    words, previous = [], []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME:
            if not (token.string == "exit" and previous[-2:] == ["sys", "."]):
                words += [(token.start[0], part) for part in token.string.lower().split("_") if part]
        elif token.type == tokenize.STRING and token.start[0] not in doc_lines:
            words += [(token.start[0], w) for w in re.findall(r"[a-z]+", token.string.lower())]
        if token.type in (tokenize.NAME, tokenize.OP):
            previous.append(token.string)
    return words


def test_core_names_no_distillation_method() -> None:
    hits = []
    for path in sorted((ROOT / "core").glob("*.py")):
        contract_lines = {i for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                          if "# kept from kdforge 0.1" in line}  # names that 0.1 runs wrote
        hits += [f"{path.name}:{line}: {word}" for line, word in _code_words(path)
                 if word in METHOD_WORDS and line not in contract_lines]
    assert hits == []


def test_core_uses_no_private_accelerate_state() -> None:
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "core").glob("*.py"))
    for name in ("_reset_state", "_shared_state", "AcceleratorState", "GradientState", "PartialState"):
        assert name not in source, name


def test_the_training_step_is_short() -> None:
    from kdforge.loop import train_step

    lines = [line for line in inspect.getsource(train_step).splitlines() if line.strip()]
    assert len(lines) <= 30, len(lines)


def _protocols() -> list[type]:
    return [obj for name, obj in vars(extensions).items()
            if inspect.isclass(obj) and getattr(obj, "_is_protocol", False) and name in PUBLIC]


def test_every_extension_point_is_public_and_documented() -> None:
    docs = (ROOT / "docs/extension-points.md").read_text(encoding="utf-8")
    protocols = _protocols()
    assert {p.__name__ for p in protocols} >= {"Task", "CompositeTeacher", "BindsStudent", "FollowsStudent",
                                                "RenamesTaps", "NeedsTeacher", "TapsFeatures", "ExtraOutputs",
                                                "ExportsFiles", "TransformsBatch", "Generator", "Callback"}
    for protocol in protocols:
        assert f"`{protocol.__name__}`" in docs, f"{protocol.__name__} has no section in docs/extension-points.md"
        members = [n for n in vars(protocol) if not n.startswith("_")] + list(getattr(protocol, "__annotations__", {}))
        for member in members:
            assert f"`{member}" in docs, f"{protocol.__name__}.{member} is not documented"
            value = getattr(protocol, member, None)
            if callable(value):
                assert (value.__doc__ or "").strip(), f"{protocol.__name__}.{member} has no docstring"


def test_the_architecture_page_names_every_core_module() -> None:
    page = (ROOT / "docs/architecture.md").read_text(encoding="utf-8")
    missing = [p.name for p in (ROOT / "core").glob("*.py") if p.name != "__main__.py" and p.name not in page]
    assert missing == []

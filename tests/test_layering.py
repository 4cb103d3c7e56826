"""The layering README states, checked on the source: each layer imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# folder -> the corral packages its modules may import (besides their own folder)
ALLOWED: dict[str, tuple[str, ...]] = {
    "convert": (),
    "offload": ("corral.convert",),
    "app/chats": ("corral.convert", "corral.app.locations", "corral.app.runtime.api", "corral.app.runtime.state"),
    "app/runtime": ("corral.convert", "corral.offload", "corral.app.locations"),
    "tui": ("corral.convert", "corral.offload", "corral.app.runtime", "corral.app.chats", "corral.app.locations"),
    "app/serve": ("corral.convert", "corral.offload", "corral.app.runtime", "corral.app.chats", "corral.app.locations"),
    "app/cli": ("corral.convert", "corral.offload", "corral.app.runtime", "corral.app.chats", "corral.app.locations",
                "corral.tui", "corral.app.serve"),
}
UI_LIBRARIES = ("click", "textual", "rich")
PURE = ("convert", "offload")


def _package(folder: str) -> str:
    return "corral." + folder.replace("/", ".")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = "corral." + ".".join(path.relative_to(ROOT).parent.parts)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{module}" if module else base
            found += [f"{module}.{a.name}" for a in node.names]  # `from corral.app import locations` too
    return found


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_layer_imports_only_what_is_below(folder: str) -> None:
    own = _package(folder)
    allowed = (own, *ALLOWED[folder])
    bad = []
    for path in _modules(folder):
        for name in _imports(path):
            if name.startswith("corral") and not any(name == a or name.startswith(a + ".") for a in allowed):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", PURE)
def test_core_has_no_ui_no_print_no_exit(folder: str) -> None:
    bad = []
    for path in _modules(folder):
        tree = ast.parse(path.read_text())
        main_guard = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                      and "__main__" in ast.unparse(node.test) for n in ast.walk(node)}
        for name in _imports(path):
            if name.split(".")[0] in UI_LIBRARIES:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
        for node in ast.walk(tree):
            if id(node) in main_guard or not isinstance(node, ast.Call):
                continue
            called = ast.unparse(node.func)
            if called in ("print", "sys.exit", "exit", "quit"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} calls {called}")
    assert not bad, "\n".join(bad)


def test_the_checks_see_a_violation(tmp_path: Path) -> None:
    """The import reader resolves relative imports, so a hidden upward import is caught."""
    module = ROOT / "tui" / "chat_screen.py"
    names = _imports(module)
    assert any(n.startswith("corral.tui.") for n in names)  # relative imports resolved to absolute names
    assert any(n.startswith("corral.app.runtime") for n in names)

"""The layers of docs/architecture.md import only what they may: nothing imports `launcher`, `parallel` takes
only the error type (and config types for hints) from `ngdiff`, only the zero3 backend and the compat layer
import DeepSpeed, and the compat layer imports nothing of the project but itself."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, only for type checking) for every import in a file, nested ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for statement in block.body
        for node in ast.walk(statement)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in typing_only) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, node.lineno, id(node) in typing_only))
    return found


def layer_files(layer: str) -> list[Path]:
    return sorted((ROOT / layer).rglob("*.py"))


def violations(layer: str, allowed) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in layer_files(layer)
        for module, line, typing_only in imports(path)
        if not allowed(path, module, typing_only)
    ]


def top(module: str) -> str:
    return module.split(".")[0]


def test_nothing_below_the_launcher_imports_it():
    assert violations("ngdiff", lambda path, module, _: top(module) != "launcher") == []
    assert violations("parallel", lambda path, module, _: top(module) != "launcher") == []


def test_parallel_takes_only_the_error_type_and_config_hints_from_ngdiff():
    def allowed(path: Path, module: str, typing_only: bool) -> bool:
        return top(module) != "ngdiff" or module == "ngdiff.errors" or (module == "ngdiff.config" and typing_only)

    assert violations("parallel", allowed) == []


def test_deepspeed_is_imported_only_by_the_zero3_backend_and_the_compat_layer():
    def allowed(path: Path, module: str, _: bool) -> bool:
        home = path.relative_to(ROOT).as_posix()
        return top(module) != "deepspeed" or home == "parallel/zero3.py" or home.startswith("parallel/compat/")

    assert violations("ngdiff", allowed) == []
    assert violations("parallel", allowed) == []
    # and never at module level in the zero3 backend: `import parallel.zero3` stays cheap
    tree = ast.parse((ROOT / "parallel" / "zero3.py").read_text())
    top_level = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert not any(top(getattr(n, "module", None) or n.names[0].name) == "deepspeed" for n in top_level)


def test_the_compat_layer_imports_nothing_of_the_project_but_itself():
    def allowed(path: Path, module: str, _: bool) -> bool:
        own = module == "parallel.compat" or module.startswith("parallel.compat.")
        return own or top(module) not in ("ngdiff", "launcher", "parallel")

    found = violations("parallel/compat", allowed)
    assert found == []
    assert imports(ROOT / "parallel" / "compat" / "torch.py")  # the scan reads the files

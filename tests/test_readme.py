"""The README's Layout table and its dotted import paths name things that exist."""

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _layout_rows() -> list[tuple[str, str]]:
    section = README[README.index("## Layout"):]
    section = section[:section.find("\n## ", 5)] if "\n## " in section[5:] else section
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`") and "/" in cells[1]:
            rows.append((cells[1], cells[2]))
    return rows


def _module_file(name: str) -> Path:
    top = name.split("/")[0]
    return ROOT / name if top in ("generators", "cli") else ROOT / "isda_viz" / name


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def test_every_module_and_name_of_the_layout_table_exists():
    rows = _layout_rows()
    assert len(rows) >= 30
    for modules, names in rows:
        files = [_module_file(m) for m in re.findall(r"`([^`]+\.py)`", modules)]
        assert files and all(f.is_file() for f in files), modules
        defined = set().union(*(_top_level_names(f) for f in files))
        for name in re.findall(r"`([A-Za-z_][A-Za-z_0-9]*)`", names.split("(")[0] + names.split(")")[-1]):
            assert name in defined, f"{name} is not defined in {modules}"


def test_every_dotted_isda_viz_path_in_the_readme_imports():
    paths = set(re.findall(r"\bisda_viz(?:\.[A-Za-z_][A-Za-z_0-9]*)+", README))
    assert paths
    for path in sorted(paths):
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for attr in parts[cut:]:
                assert hasattr(obj, attr), f"README names {path}, but {attr} is missing"
                obj = getattr(obj, attr)
            break
        else:
            raise AssertionError(f"README names {path}, which does not import")


def test_the_readme_imports_in_code_blocks_work():
    for module, names in re.findall(r"^from (isda_viz[\w.]*) import ([\w, ]+)$", README, flags=re.M):
        mod = importlib.import_module(module)
        for name in names.split(","):
            assert hasattr(mod, name.strip()), f"from {module} import {name.strip()}"

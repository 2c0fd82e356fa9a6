"""The house: every import points down the table in the README's Architecture section, and that table is generated
from the same rules; the status table is the vocabulary's own."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "safetypairs"
GROUND = {"schema", "statuses", "policy", "images", "identity", "instructions", "utils", "usage", "policies"}
GENERATION = {"sources", "instruct", "edit", "generate"}
# part -> the parts it may import (besides itself and the ground floor)
ALLOWED = {
    "cli": {"*"},
    "__main__": {"cli"},
    "demo": {"recipe", "probes", "release", "evaluate", "validate", "review", "engine", "backends"} | GENERATION,
    "probes": {"evaluate", "sources", "engine", "backends"},
    "release": {"validate", "review", "evaluate.caveats", "engine", "backends"},
    "evaluate": {"engine", "backends"},
    "validate": {"sources", "review.store", "engine", "backends"},
    "review": {"engine"},
    "recipe": {"review.store", "engine", "backends"},
    "generate": {"sources", "instruct", "edit", "engine", "backends"},
    "sources": {"engine", "backends"},
    "instruct": {"engine", "backends"},
    "edit": {"engine", "backends"},
    "engine": set(),
    "backends": set(),
    "__init__": {"*"},  # the package's lazy public names
}


def _part(module: str) -> str:
    """``safetypairs.validate.decision`` -> ``validate``; ground modules -> ``ground``."""
    first = module.split(".")[1] if "." in module else "__init__"
    return "ground" if first in GROUND else first


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("safetypairs"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names
                         if node.module == "safetypairs" and not a.name.startswith("__"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("safetypairs"))
    return found


def _module(path: Path) -> str:
    parts = ("safetypairs",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def _allowed(source: str, target: str) -> bool:
    src, dst = _part(source), _part(target)
    if dst in ("ground", src) or target == "safetypairs" or "*" in ALLOWED[src]:
        return True
    rest = target.removeprefix("safetypairs.")
    return dst in ALLOWED[src] or any(rest == a or rest.startswith(a + ".") for a in ALLOWED[src])


def test_every_import_points_down():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _module(path)
        wrong += [f"{source} -> {target}" for target in sorted(_imports(path)) if not _allowed(source, target)]
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_the_ground_floor_imports_only_the_ground_floor():
    for name in GROUND - {"policies"}:
        targets = {_part(t) for t in _imports(PACKAGE / f"{name}.py") if t != "safetypairs"}
        assert targets <= {"ground"}, (name, targets)


def test_every_part_of_the_table_exists():
    parts = {_part(_module(p)) for p in PACKAGE.rglob("*.py")} - {"ground"}
    assert parts == set(ALLOWED), parts ^ set(ALLOWED)


def test_the_readme_status_table_is_the_vocabulary():
    from safetypairs.statuses import markdown_table

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- statuses:start -->\n(.*?)\n<!-- statuses:end -->", readme, re.S)
    assert block, "README.md lacks the generated status table"
    assert block.group(1) == markdown_table(), "regenerate it: python -m safetypairs.statuses"

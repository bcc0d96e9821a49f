"""The library's shape: imports run one way (down the floors, never in a circle), the qfx/ root
stays small, and no library file grows past 500 lines.

Imports are read with `ast`, so an import hidden inside a function counts like one at the top of
the file (it runs just the same, only later). `passes/` and `backends/` are imported as
`qfx.passes` and `qfx.backends`; the walk maps them back to their folders.

Floors, bottom -> top; a module may import the same or a lower floor, never a higher one:

    _version, config, targets, models < numerics < ops < backends < schema, capture < passes
    < pipeline < tune < runtime < api < train < embeddings, decoders < cli, __main__, the qfx package
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LIBRARY_DIRS = {"qfx": ("qfx",), "passes": ("qfx", "passes"), "backends": ("qfx", "backends")}
MAX_LINES = 500
MAX_ROOT_MODULES = 12

FLOORS = [
    {"_version", "config", "targets", "models"},
    {"numerics"},
    {"ops"},
    {"backends"},
    {"schema", "capture"},
    {"passes"},
    {"pipeline"},
    {"tune"},
    {"runtime"},
    {"api"},
    {"train"},
    {"embeddings", "decoders"},
    {"cli", "__main__", ""},  # "" is the qfx package itself: `from qfx import compile`
]
FLOOR_OF = {room: level for level, rooms in enumerate(FLOORS) for room in rooms}


def _library_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of qfx/, passes/ and backends/."""
    modules = {}
    for folder, prefix in LIBRARY_DIRS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(prefix) + list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _library_files()


def _resolve(name: str) -> str | None:
    """The longest library module that `name` (a module or module.attribute) lies in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported_modules(module: str, path: Path) -> set[str]:
    """Library modules that `module` imports anywhere in its file (top level and inside functions).

    `from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg`; inside
    a subpackage `pkg` itself it is also an edge to `pkg` (its __init__ runs first: a circle
    when that __init__ imports the importer back). `from . import x` and `from .x import y` resolve
    against the importer's package."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names = [
                f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                for alias in node.names
            ]
            if source != "qfx" and module.startswith(source + "."):
                # `from pkg import sibling` inside pkg runs pkg/__init__ first: an edge to the
                # package (the top package is exempt: `from qfx import numerics` names a room)
                names.append(source)
        else:
            continue
        for name in names:
            target = _resolve(name) if name.split(".")[0] == "qfx" else None
            if target and target != module:
                found.add(target)
    return found


GRAPH = {module: _imported_modules(module, path) for module, path in MODULES.items()}


def floor(module: str) -> int:
    """The floor of a library module: by its room, the first name after `qfx.`."""
    room = module.split(".")[1] if "." in module else ""
    if room not in FLOOR_OF:
        raise AssertionError(
            f"module {module} is in room {room!r}, which has no floor: add it to FLOORS in {__file__}"
        )
    return FLOOR_OF[room]


def _circles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(GRAPH[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    return components


def test_the_walk_sees_the_known_structure():
    # guards the walker itself: a broken resolver would make the other tests pass vacuously
    assert "qfx.passes.annotate" in MODULES and "qfx.backends.cutlass" in MODULES
    assert "qfx.targets" in GRAPH["qfx.passes.annotate"] or "qfx.schema" in GRAPH["qfx.passes.annotate"]
    assert "qfx.api" in GRAPH["qfx"]


def test_the_walk_reads_every_kind_of_import(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text(
        "from qfx.train import ddp\n"          # a sibling through its package: the package runs too
        "from qfx import numerics\n"           # a room of the top package: that room only
        "def later():\n"
        "    import qfx\n"                     # inside a function: counted all the same
        "    from .losses import kd_loss\n"    # relative, resolved against qfx.train
    )
    assert _imported_modules("qfx.train.probe", src) == {
        "qfx.train.ddp", "qfx.train", "qfx.numerics", "qfx", "qfx.train.losses"}


def test_every_module_has_a_floor():
    for module in MODULES:
        floor(module)


def test_no_upward_import():
    upward = sorted(
        f"{importer} (floor {floor(importer)}) -> {imported} (floor {floor(imported)})"
        for importer, imported_set in GRAPH.items()
        for imported in imported_set
        if floor(imported) > floor(importer)
    )
    assert not upward, "imports that run back up:\n  " + "\n  ".join(upward)


def test_no_import_circle():
    circles = []
    for component in _circles():
        members = set(component)
        edges = sorted(f"{a} -> {b}" for a in component for b in GRAPH[a] if b in members)
        circles.append(" | ".join(edges))
    assert not circles, "import circles (edges inside each):\n  " + "\n  ".join(circles)


def test_qfx_root_stays_small():
    root_modules = sorted(path.name for path in (REPO / "qfx").glob("*.py"))
    assert len(root_modules) <= MAX_ROOT_MODULES, (
        f"{len(root_modules)} modules at the qfx/ root (at most {MAX_ROOT_MODULES}): {root_modules}; "
        "move a concern into its room (a subpackage)"
    )


@pytest.mark.parametrize("folder", sorted(LIBRARY_DIRS))
def test_no_library_file_over_500_lines(folder):
    long_files = sorted(
        f"{path.relative_to(REPO)} ({count} lines)"
        for path in (REPO / folder).rglob("*.py")
        if (count := len(path.read_text().splitlines())) > MAX_LINES
    )
    assert not long_files, f"library files over {MAX_LINES} lines (split by concern): {long_files}"

"""The package's import layers, read from the source with ``ast`` (every import statement, at any depth of
a module, function-level ones included): the algorithm needs nothing from ``pcm_train.training``,
``pcm_train.runtime`` (below both) needs nothing of pcm_train, and no pcm_train modules import each other
in a cycle."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in (ROOT / "pcm_train").rglob("*.py")}


def imported(name: str) -> set[str]:
    """The pcm_train modules ``name``'s source imports, with the packages they run on the way
    (``import a.b.c`` runs ``a`` and ``a.b`` first), less ``name``'s own packages (already running)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    found = set()
    for target in targets:
        parts = target.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in MODULES)
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}  # run before ``name``
    return found - {name} - ancestors


GRAPH = {name: imported(name) for name in MODULES}


def import_chains(start: str) -> dict[str, list[str]]:
    """Every pcm_train module ``start`` imports, directly or not, with one chain of imports leading to it."""
    chains = {start: [start]}
    stack = [start]
    while stack:
        name = stack.pop()
        for target in sorted(GRAPH[name]):
            if target not in chains:
                chains[target] = chains[name] + [target]
                stack.append(target)
    return chains


def test_the_parser_sees_the_imports_that_exist():
    assert "pcm_train.algorithm.grpo" in GRAPH["pcm_train.algorithm.actor"]  # from pcm_train.algorithm.grpo import
    assert "pcm_train.envs.libero" in GRAPH["pcm_train.envs.families"]  # from . import libero, metaworld
    assert "pcm_train.training.checkpoint" in GRAPH["pcm_train.training.trainer"]  # from pcm_train.training import
    assert "pcm_train.tools.report" in GRAPH["pcm_train.run"]  # inside a function
    assert "pcm_train.runtime" in GRAPH["pcm_train.training.trainer"]  # the package of an imported module


@pytest.mark.parametrize("start", sorted(name for name in MODULES if name.startswith("pcm_train.algorithm")))
def test_the_algorithm_needs_nothing_from_training(start):
    upward = {name: chain for name, chain in import_chains(start).items() if name.startswith("pcm_train.training")}
    assert not upward, "\n".join(" -> ".join(chain) for chain in upward.values())


def test_runtime_is_below_everything():
    for name in (name for name in MODULES if name.startswith("pcm_train.runtime")):
        above = {m for m in import_chains(name) if not m.startswith("pcm_train.runtime")}
        assert not above, (name, sorted(above))


def test_no_import_cycles():
    visiting, done = [], set()

    def visit(name):
        if name in visiting:
            raise AssertionError("import cycle: " + " -> ".join(visiting[visiting.index(name):] + [name]))
        if name in done:
            return
        visiting.append(name)
        for target in sorted(GRAPH[name]):
            visit(target)
        visiting.pop()
        done.add(name)

    for name in sorted(MODULES):
        visit(name)

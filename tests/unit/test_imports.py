"""The product's import graph: no cycles, layers that only import downwards, local imports only with a reason."""

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("models", "parallel", "launch", "orchestrator")
# What each top-level package may import from the others: the model knows nothing of parallelism,
# parallelism nothing of launching, launching nothing of the training program.
MAY_IMPORT = {
    "models": set(),
    "parallel": {"models"},
    "launch": set(),
    "orchestrator": {"models", "parallel", "launch"},
}
# orchestrator/'s parts, top down (orchestrator/__init__.py says what each holds): each imports only its own
# part and those before it. A module outside every part fails the test: a new one takes its place here.
ORCHESTRATOR_ORDER = [
    "orchestrator.config",
    "orchestrator.data",
    "orchestrator.build",
    "orchestrator.validate",
    "orchestrator.slurm_checks",
    "orchestrator.runs",
    "orchestrator.generate",
    "orchestrator.evaluate",
    "orchestrator.planner",
    "orchestrator.train",
    "orchestrator.search",
    "orchestrator.cli",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def product_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> list[tuple[str, ast.stmt, bool]]:
    """(imported product module, the statement, whether it sits inside a function) for each import."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            # The longest product module the name starts with (`from a.b import c` may name module a.b.c).
            target = next((m for m in sorted(known, key=len, reverse=True) if name == m or name.startswith(m + ".")),
                          None)
            if target is not None:
                found.append((target, node, id(node) in local))
    return found


def graph() -> dict[str, set[str]]:
    mods = product_modules()
    return {m: {t for t, _, _ in imports_of(p, set(mods)) if t != m} for m, p in mods.items()}


def find_cycle(edges: dict[str, set[str]]):
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_no_module_of_the_product_imports_itself_back_through_a_cycle():
    edges = graph()
    assert len(edges) > 30  # the walk sees the product
    assert find_cycle(edges) is None


def test_find_cycle_reports_a_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_each_package_imports_only_the_layers_below_it_and_no_library_module_imports_a_cli():
    bad = []
    for m, targets in graph().items():
        pkg = m.split(".")[0]
        for t in targets:
            other = t.split(".")[0]
            if other != pkg and other not in MAY_IMPORT[pkg]:
                bad.append(f"{m} imports {t}")
            if t.startswith("orchestrator.cli") and not m.startswith("orchestrator.cli") and not entry_point(m):
                bad.append(f"{m} imports the entry point {t}")
    assert bad == []


def entry_point(module: str) -> bool:
    """`python -m` of a package: an entry point, as cli/ is."""
    return module.endswith(".__main__")


def part_of(module: str):
    """The index in ORCHESTRATOR_ORDER of the part that holds an orchestrator module (cli/ for a __main__)."""
    if entry_point(module):
        return len(ORCHESTRATOR_ORDER) - 1
    return next((i for i, p in enumerate(ORCHESTRATOR_ORDER) if module == p or module.startswith(p + ".")), None)


def test_orchestrator_parts_import_only_the_parts_before_them():
    edges = graph()
    parts = {m: part_of(m) for m in edges if m.startswith("orchestrator.")}
    assert [m for m, i in parts.items() if i is None] == []  # every module has its place in the order
    assert {ORCHESTRATOR_ORDER[i] for i in parts.values()} == set(ORCHESTRATOR_ORDER)  # no part is empty
    bad = [f"{m} ({ORCHESTRATOR_ORDER[parts[m]]}) imports {t} ({ORCHESTRATOR_ORDER[parts[t]]})"
           for m in parts for t in edges[m] if t in parts and parts[t] > parts[m]]
    assert bad == []


def test_part_of_places_modules_and_an_upward_import_is_caught():
    assert ORCHESTRATOR_ORDER[part_of("orchestrator.data.chat")] == "orchestrator.data"
    assert ORCHESTRATOR_ORDER[part_of("orchestrator.validate")] == "orchestrator.validate"
    assert part_of("orchestrator.validator") is None  # a prefix is not a part
    assert ORCHESTRATOR_ORDER[part_of("orchestrator.train.__main__")] == "orchestrator.cli"
    assert part_of("orchestrator.runs.checkpoint") < part_of("orchestrator.train.trainer")


def test_no_more_than_three_function_local_imports_of_the_product():
    """Deferred imports hide the order above; the three left defer a heavy or optional import (their comments)."""
    mods = product_modules()
    local = {(m, node.lineno) for m, p in mods.items() for t, node, inside in imports_of(p, set(mods))
             if inside and t != m}
    assert len(local) <= 3, sorted(local)


def test_function_local_imports_say_why_in_a_comment():
    """Only a heavy or optional import may be deferred into a function, with its reason beside it."""
    unexplained = []
    for m, path in product_modules().items():
        lines = path.read_text().splitlines()
        tree = ast.parse(path.read_text())
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    here, above = lines[node.lineno - 1], lines[node.lineno - 2]
                    if "#" not in here and not above.strip().startswith("#"):
                        unexplained.append(f"{m}:{node.lineno}: {here.strip()}")
    assert unexplained == []


def test_training_and_the_gpu_bench_import_without_submitit_or_wandb(tmp_path):
    """A GPU box with torch, hydra and omegaconf only (../shared/gpu/README.md) runs launcher=local with W&B off."""
    import subprocess
    import sys

    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nfor name in ('submitit', 'wandb'):\n    sys.modules[name] = None  # import raises ImportError\n")
    code = ("import orchestrator.cli.train, orchestrator.cli.plan, orchestrator.train.trainer, orchestrator.search.sweep, "
            "launch.slurm, runpy; runpy.run_path('bench/gpu_step.py', run_name='not_main')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]

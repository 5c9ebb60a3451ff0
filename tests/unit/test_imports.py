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
            if t.startswith("orchestrator.cli") and not m.startswith("orchestrator.cli"):
                bad.append(f"{m} imports the entry point {t}")
    assert bad == []


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
    code = ("import orchestrator.cli.train, orchestrator.cli.plan, orchestrator.trainer, orchestrator.sweep, "
            "launch.slurm, runpy; runpy.run_path('bench/gpu_step.py', run_name='not_main')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]

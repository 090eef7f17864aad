"""The import rules of the layout (docs/architecture.md, "Layout"), read from every project module's imports with ast:
pipeline/ <- model/ <- the training machinery (run/) and tools <- the scripts (train.py, eval.py, benchmarks/);
no cycle; backends reached only through the factory; the batch contract imports no backend."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "model", "run", "benchmarks")
FACTORY = "pipeline.backends"
BACKENDS = {"pipeline.backends.dali", "pipeline.backends.ffcv", "pipeline.backends.torchvision"}
# What a backend may import: the package (its optional-library checks), the contract, the crop plan, the
# augmentation and data reading.
BACKEND_MAY_IMPORT = {"pipeline", "pipeline.loader", "pipeline.crop_plan", "pipeline.augment", "pipeline.data"}
# CLIs beside the training machinery, run/: one that runs a model, and pipeline/'s two that take train.py's
# flags from its settings (model/config.py)
TOOLS = {"model.pairs", "pipeline.convert", "pipeline.views"}
SCRIPTS = {"train", "eval"}


def project_modules() -> dict[str, Path]:
    """Module name -> file, for train.py, eval.py and every .py under the packages (tests are not modules)."""
    modules = {name: ROOT / f"{name}.py" for name in SCRIPTS}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(project module, line) for every import in `path`, at any depth (a function's lazy import counts too).
    `from a import b` imports a.b when that is a module; importing a.b runs package a's __init__ too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package up
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for depth in range(1, len(parts) + 1):  # the packages on the way run first
                module = ".".join(parts[:depth])
                if module in modules and module != name:
                    found.append((module, node.lineno))
    return found


def level(name: str) -> int:
    """0 pipeline/, 1 model/, 2 the training machinery (run/) and tools, 3 the scripts and benchmarks/."""
    if name in SCRIPTS or name.split(".")[0] == "benchmarks":
        return 3
    if name in TOOLS:
        return 2
    return {"pipeline": 0, "model": 1, "run": 2}[name.split(".")[0]]


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int]]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def where(name: str, line: int) -> str:
    return f"{project_modules()[name].relative_to(ROOT)}:{line}"


def test_the_graph_is_read():
    """The rules below check something: the scanner sees the layout's known imports."""
    modules = project_modules()
    assert {"pipeline.loader", "pipeline.backends", "run.state", "train", "benchmarks.doctor"} <= set(modules)
    edges = {
        name: {target for target, _ in found}
        for name, found in ((n, imports_of(n, p, modules)) for n, p in modules.items())
    }
    assert "pipeline.backends.ffcv" in edges["pipeline.backends"]  # the lazy `from pipeline.backends.ffcv import`
    assert {"pipeline.loader", "pipeline"} <= edges["pipeline.backends.dali"]
    assert {"pipeline.loader", "pipeline.data"} <= edges["pipeline.backends.ffcv"]
    assert "run.step" in edges["train"] and "run.step" in edges["benchmarks.train_step"]


def test_imports_run_one_way(graph):
    """pipeline <- model <- training machinery and tools <- scripts: nothing imports a module of a higher level."""
    upward = [
        f"{where(name, line)}: {name} (level {level(name)}) imports {target} (level {level(target)})"
        for name, found in graph.items()
        for target, line in found
        if level(target) > level(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_module_imports_a_script(graph):
    wrong = [
        f"{where(name, line)}: {name} imports the script {target}"
        for name, found in graph.items()
        for target, line in found
        if target in SCRIPTS
    ]
    assert not wrong, "\n".join(wrong)


def test_backends_only_through_the_factory(graph):
    wrong = [
        f"{where(name, line)}: {name} imports the backend {target}; use pipeline.backends.make_loader"
        for name, found in graph.items()
        for target, line in found
        if target in BACKENDS and name != FACTORY
    ]
    assert not wrong, "\n".join(wrong)
    assert BACKENDS == {name for name in project_modules() if name.startswith(FACTORY + ".")}


def test_backends_import_only_the_contract_crop_plan_augmentation_and_data(graph):
    wrong = [
        f"{where(name, line)}: the backend {name} imports {target}"
        for name in BACKENDS
        for target, line in graph[name]
        if target not in BACKEND_MAY_IMPORT
    ]
    assert not wrong, "\n".join(wrong)


def test_the_contract_imports_no_backend(graph):
    wrong = [
        f"{where('pipeline.loader', line)}: imports {target}"
        for target, line in graph["pipeline.loader"]
        if target == FACTORY or target in BACKENDS
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle(graph):
    """No two project modules import each other, directly or through others."""
    edges = {name: sorted({target for target, _ in found}) for name, found in graph.items()}
    state: dict[str, str] = {}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in edges[name]:
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(cycles)


def project_files() -> list[Path]:
    """Every .py of the checkout: the scripts, the packages, tests/ and any other folder (not .venv, data)."""
    skip = {".venv", "data", "runs", ".git"}
    return [p for p in sorted(ROOT.rglob("*.py")) if not skip & set(p.relative_to(ROOT).parts)]


def test_no_file_edits_sys_path():
    """The project installs as a package (pyproject.toml, setup.sh's pip install -e .; pytest's pythonpath for the
    scripts): no module, script, benchmark or test reaches sys.path to find the project."""
    wrong = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in project_files()
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
    ]
    assert project_files() and not wrong, "sys.path used at " + ", ".join(wrong)


def test_pyproject_lists_every_package():
    """pip install -e . installs exactly the folders that are packages (an __init__.py), tests/ aside."""
    import tomllib

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in project_files()
        if path.name == "__init__.py" and path.parts[len(ROOT.parts)] != "tests"
    }
    assert sorted(listed) == sorted(found)


def function_lengths(path: Path) -> dict[str, int]:
    """Lines of every function and method in `path`, from its `def` to its last line (decorators aside)."""
    return {
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}": node.end_lineno - node.lineno + 1
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


def test_the_trainer_is_wiring():
    """train.py's loop reads in one sitting (its `train` wires run/'s objects in about 60 lines) and no function
    of train.py or of the run machinery (run/) is over 80 lines."""
    lengths = {
        k: v for p in [ROOT / "train.py", *sorted((ROOT / "run").glob("*.py"))] for k, v in function_lengths(p).items()
    }
    long = [f"{name}: {count} lines" for name, count in lengths.items() if count > 80]
    [loop] = [count for name, count in lengths.items() if name.startswith("train.py:") and name.endswith(" train")]
    assert len(lengths) > 50 and not long, "\n".join(long)
    assert loop <= 60, f"train.py's train is {loop} lines"


def test_no_function_of_the_project_is_over_80_lines():
    """Every module's functions (the scripts, pipeline/, model/, run/, benchmarks/; tests aside) read in one
    sitting: none over 80 lines, decorators aside."""
    lengths = {k: v for path in project_modules().values() for k, v in function_lengths(path).items()}
    long = [f"{name}: {count} lines" for name, count in lengths.items() if count > 80]
    assert len(lengths) > 300 and not long, "\n".join(long)

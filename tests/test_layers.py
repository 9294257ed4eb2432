"""The package's import rules (README's Layout): no import circle at load time, the model imports neither the trainer
nor the data nor Hydra, the report reads run files and never the loop, no library module imports a command, and the
shared ground (gpt2/*.py besides the commands) imports only itself. Read from the source, nothing imported."""

import ast

from helpers import REPO

PACKAGE = REPO / "gpt2"
COMMANDS = {"gpt2.cli", "gpt2.bench", "gpt2.prepare", "gpt2.evaluate", "gpt2.hf_export", "gpt2.sample",
            "gpt2.serve", "gpt2.report"}


def module_name(path) -> str:
    name = path.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
    return name.removesuffix(".__init__")


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(path, top_level_only=False) -> set:
    """The gpt2 modules a file imports (`from gpt2.x import y` counts gpt2.x.y when that is a module) and the
    outside packages it imports, by their first name; with top_level_only, the imports run when it loads."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name if name.startswith("gpt2") else name.split(".")[0] for name in found}


def in_package(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def offenders(source: str, forbidden) -> dict:
    return {m: sorted(d for d in imports(p) if any(in_package(d, f) for f in forbidden))
            for m, p in MODULES.items() if in_package(m, source)
            and any(in_package(d, f) for f in forbidden for d in imports(p))}


def circle(graph: dict):
    """An import circle of `graph` ({module: modules it imports}) as a list ending where it began, or None."""
    state = {}

    def visit(m, trail):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return trail[trail.index(d):] + [d]
            found = None if d in state else visit(d, trail + [d])
            if found:
                return found
        state[m] = "done"

    for m in sorted(graph):
        found = None if m in state else visit(m, [m])
        if found:
            return found


def test_no_import_circle_when_the_package_loads():
    graph = {m: {d for d in imports(p, top_level_only=True) if d in MODULES and d not in ("gpt2", m)}
             for m, p in MODULES.items()}
    assert circle(graph) is None


def test_the_model_imports_neither_trainer_nor_data_nor_hydra():
    assert offenders("gpt2.model", ["gpt2.training", "gpt2.data", "gpt2.runs", "hydra", "omegaconf"]) == {}


def test_the_report_reads_run_files_never_the_loop_or_the_model():
    assert offenders("gpt2.reporting", ["gpt2.training", "gpt2.model", "gpt2.runs", "torch"]) == {}


def test_no_library_module_imports_a_command():
    library = [m for m in MODULES if m not in COMMANDS and m != "gpt2"]
    found = {m: sorted(set(imports(MODULES[m])) & COMMANDS) for m in library if set(imports(MODULES[m])) & COMMANDS}
    assert found == {}


def test_the_shared_ground_imports_only_itself():
    ground = {m for m, p in MODULES.items() if p.parent == PACKAGE and m not in COMMANDS}
    found = {m: sorted(d for d in imports(MODULES[m]) if d.startswith("gpt2.") and d not in ground)
             for m in ground}
    assert {m: d for m, d in found.items() if d} == {}


# the layers, lowest first: a module imports only modules of its own layer or below. The ground is gpt2/*.py
# besides the commands; the report sits below runs/ (a sweep's end builds it); the top holds the commands and
# the parts only they use (serving/, benchmark/).
LAYERS = ["ground", "gpt2.model", "gpt2.data", "gpt2.evaluation", "gpt2.training", "gpt2.reporting", "gpt2.runs",
          "top"]


def layer(module: str) -> int:
    if module in COMMANDS or module.split(".")[:2] in (["gpt2", "serving"], ["gpt2", "benchmark"]):
        return LAYERS.index("top")
    package = ".".join(module.split(".")[:2])
    return LAYERS.index(package) if package in LAYERS else LAYERS.index("ground")


def upward_imports() -> dict:
    up = {m: sorted(d for d in imports(p) if d in MODULES and layer(d) > layer(m)) for m, p in MODULES.items()}
    return {m: d for m, d in up.items() if d}


def test_every_import_runs_down_the_layers():
    assert upward_imports() == {}
    assert layer("gpt2.config") < layer("gpt2.model.gpt") < layer("gpt2.training.loop") < layer("gpt2.report")


def test_the_rules_see_an_import_that_breaks_them(tmp_path, monkeypatch):
    bad = tmp_path / "gpt2" / "model" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("import torch\n\n\ndef f():\n"
                   "    from gpt2.training.loop import train\n    from gpt2 import report\n")
    monkeypatch.setitem(MODULES, "gpt2.model.bad", bad)
    assert offenders("gpt2.model", ["gpt2.training"]) == {"gpt2.model.bad": ["gpt2.training.loop"]}
    assert upward_imports() == {"gpt2.model.bad": ["gpt2.report", "gpt2.training.loop"]}
    assert "gpt2.report" in imports(bad) and "torch" in imports(bad)
    assert circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_every_sub_package_is_in_pyproject():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert packages - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml (a wheel lacks them)"

"""The package's structure stays as declared: the import layers (import-linter contracts in
pyproject.toml), no import cycle, task loops that read top to bottom, no function over 60 lines,
and comments that cite
only what a reader of the repository can follow."""

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fcmae"


def test_import_layers_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a dev dependency: pip install -e '.[dev]'"
    proc = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and "0 broken" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_no_import_cycle():
    graph = grimp.build_graph("fcmae")
    modules = sorted(graph.modules)
    edges = {m: graph.find_modules_directly_imported_by(m) for m in modules}
    state, cycles = {}, []

    def visit(m, path):  # depth-first search; a back edge closes a cycle
        state[m] = "open"
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycles.append(path[path.index(n) :] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in modules:
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles[:5]


def _function(path: Path, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef) and n.name == name)


def test_task_loops_are_short():
    for task in ("pretrain", "classify", "segment", "detect"):
        fn = _function(PKG / "tasks" / task / "loop.py", "train")
        assert fn.end_lineno - fn.lineno + 1 <= 80, f"{task}/loop.py:train is {fn.end_lineno - fn.lineno + 1} lines"


def test_no_function_is_over_60_lines():
    """Every function of the package, decorators excluded, docstring included, as ruff formats it."""
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in sorted(PKG.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long, long


def test_sources_cite_nothing_a_reader_cannot_see():
    pattern = re.compile(r"REFERENCE\.md|shared/(REFERENCE|DESIGN|STYLE)|\b[Ii]ssue \d+\b")
    files = [
        p
        for d in ("fcmae", "finetune", "tests", "benchmarks", "configs")
        for p in (ROOT / d).rglob("*")
        if p.suffix in (".py", ".yaml", ".sh") and p.name != "test_layout.py"
    ] + [ROOT / "README.md"]
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not hits, hits[:10]


def test_readme_commands_are_what_ci_runs():
    """README command 1 installs as .ci/run installs (its demo part is read from the README by
    .ci/check_demo.sh), and command 2 is the test command .ci/run runs."""
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2, commands
    setup, tests = commands
    install = re.search(r"pip install [^&]+", setup).group(0).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert install.replace("pip install ", "pip install -q ") in ci, install
    assert setup.rsplit("&& ", 1)[1].startswith("accelerate launch ") and "check_demo.sh" in ci
    assert tests in ci.replace(" --durations=25", ""), tests


def test_hosted_ci_workflow_parses_and_runs_the_ci_script():
    import yaml

    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    assert set(flow[True]) >= {"push", "pull_request"}  # YAML 1.1 reads the key `on` as True
    steps = [step for job in flow["jobs"].values() for step in job["steps"]]
    runs = [step.get("run", "") for step in steps]
    assert any(r.strip() == "bash .ci/run" for r in runs), runs
    apt = next(r for r in runs if "apt-get install" in r)
    assert "sudo" in apt and all(p in apt for p in ("libopenblas-dev", "slurmctld", "slurmd", "munge"))
    assert any(step.get("with", {}).get("python-version") == "3.11" for step in steps)

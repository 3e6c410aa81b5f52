"""One import namespace (`fedmoe`), a wheel that installs nothing else, imports that go one way.

The project once installed top-level `kernels`, `model`, `crypto`, ... packages; `kernels` shadowed
Hugging Face's distribution of that name, which transformers >= 5.25 imports, and every parity test
failed on a fresh resolve. These tests keep it from coming back.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OLD_TOP_LEVEL = ("kernels", "model", "crypto", "protocol", "audit", "fl_client", "fl_server")


def test_no_generic_top_level_package_at_the_repository_root():
    shadowing = [name for name in OLD_TOP_LEVEL if (ROOT / name).exists() or (ROOT / f"{name}.py").exists()]
    assert shadowing == [], f"importable from the repository root as top-level names: {shadowing}"


def test_hugging_face_kernels_imports_from_the_repository_root():
    # `python -c` puts the working directory first on sys.path: exactly where a shadowing folder would win.
    code = "import transformers.integrations.hub_kernels, kernels; kernels.CUDAProperties; print(kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "site-packages" in out.stdout, out.stdout


@pytest.mark.slow
def test_the_wheel_installs_only_the_fedmoe_namespace(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("fedmoe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"fedmoe"}, sorted(top_level)
    assert "fedmoe/model/presets.json" in names  # package data travels with the code
    assert {"fedmoe/fl_server/app.py", "fedmoe/fl_client/app.py", "fedmoe/kernels/__init__.py"} <= set(names)
    # Installed into a bare target folder next to Hugging Face's `kernels`: `kernels` is still theirs.
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    code = f"import sys; sys.path.insert(0, {str(target)!r}); import kernels; kernels.CUDAProperties; import fedmoe"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """fedmoe module -> fedmoe modules it imports anywhere in its body (lazy imports included)."""
    modules = {_module_name(f): f for f in (ROOT / "fedmoe").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_imports_go_one_way():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_functions_of_the_round_loop_and_the_bank_fit_on_a_screen():
    files = [*sorted((ROOT / "fedmoe" / "fl_server").glob("*.py")), ROOT / "fedmoe" / "fl_client" / "bank.py"]
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in files
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert long == []


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "fedmoe", "--help"],
        ["-m", "fedmoe.fl_server.launch", "--help"],
        ["-m", "fedmoe.audit", "--help"],
        ["-m", "fedmoe.model", "--help"],
        ["-m", "fedmoe.crypto", "--help"],
        ["-m", "fedmoe", "generate", "--help"],
        ["-m", "fedmoe", "export", "--help"],
    ],
)
def test_entry_points_print_help(argv):
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage" in out.stdout.lower()


def test_console_scripts_are_installed():
    bindir = Path(sys.executable).parent
    for script in ("fedmoe", "fedmoe-launch", "fedmoe-audit", "fedmoe-export", "fedmoe-generate", "fedmoe-supernode"):
        assert (bindir / script).exists(), f"{script} is not installed next to {sys.executable} (pip install -e .)"
    out = subprocess.run([str(bindir / "fedmoe-audit"), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--pins" in out.stdout, out.stderr[-2000:]

"""`python -m fx_sparsity bench --quick`: every case runs and reports ratios (no timing asserted).

The benchmarks are the installed package ``fx_sparsity.benchmarks``; ``tools/bench*.py`` call into it.
"""
import ast
import importlib
import json
import math
import os
import re
import runpy
import shutil
import subprocess
import sys

import pytest

from fx_sparsity.__main__ import main


@pytest.mark.slow
def test_quick_bench_all_cases(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["case"] for r in rows} == {"mask_update", "prepare", "memory", "scopes", "structured", "train_step", "inference"}
    mask_rows = [r for r in rows if r["case"] == "mask_update"]
    assert len(mask_rows) == 3 and all(r["masks_identical"] for r in mask_rows)
    for row in rows:
        ratios = row.get("ratios") or {}
        assert ratios, row["name"]
        assert all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in ratios.values()), row
    memory = {r["name"]: r["ratios"] for r in rows if r["case"] == "memory"}
    assert memory["masks, dtype=float32"]["mask / weight bytes"] == 1.0
    assert memory["masks, dtype=bool"]["mask / weight bytes"] == 0.25
    printed = capsys.readouterr().out
    assert "## mask_update" in printed and "## inference" in printed


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "fx_sparsity", "benchmarks")


@pytest.mark.parametrize("script, module", [("bench", "suite"), ("bench_train_step", "train_step"),
                                            ("bench_inference", "inference"), ("bench_lowering", "lowering")])
def test_tools_scripts_call_the_package(script, module):
    """tools/bench*.py are thin: their main is the installed package's (same flags, same code)."""
    namespace = runpy.run_path(os.path.join(ROOT, "tools", f"{script}.py"), run_name="not_main")
    assert namespace["main"] is importlib.import_module(f"fx_sparsity.benchmarks.{module}").main


def test_benchmarks_use_only_the_public_api():
    """The benchmarks measure what users call: ``fx_sparsity``'s public names and ``fx_sparsity.timing``."""
    import fx_sparsity

    allowed_modules = {"fx_sparsity", "fx_sparsity.timing"}
    for name in sorted(os.listdir(BENCHMARKS)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(BENCHMARKS, name), encoding="utf-8").read())
        aliases = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("fx_sparsity"):
                        assert alias.name in allowed_modules, (name, alias.name)
                        if alias.name == "fx_sparsity":
                            aliases.add(alias.asname or alias.name)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.startswith("fx_sparsity"):
                if node.module.startswith("fx_sparsity.benchmarks"):
                    continue
                assert node.module in allowed_modules, (name, node.module)
                if node.module == "fx_sparsity":
                    assert all(a.name in fx_sparsity.__all__ for a in node.names), (name, node.module)
        for node in ast.walk(tree):  # fxs.<name>: a public name
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                assert node.attr in fx_sparsity.__all__, (name, node.attr)


def _copy_source(dest):
    """The checkout's files without build leftovers (a stale build/ would end up in the wheel)."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis", ".benchmarks", "*.pyc"))


# Hides an editable install of fx_sparsity from the child processes: its import hook would
# otherwise fill in, from the checkout, any subpackage the wheel lacks.
_NO_EDITABLE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
"""


@pytest.mark.slow
def test_bench_runs_from_an_installed_wheel(tmp_path):
    """``python -m fx_sparsity bench`` from a (non-editable) wheel install, far from the checkout."""
    src, wheels, site, hooks, elsewhere = (tmp_path / d for d in ("src", "wheels", "site", "hooks", "elsewhere"))
    _copy_source(src)
    elsewhere.mkdir()
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_NO_EDITABLE)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # No build isolation: setuptools from this environment, no index needed.
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("fx_sparsity-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(hooks)])}

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)

    proc = run("-c", "import sys, fx_sparsity, fx_sparsity.benchmarks.suite, fx_sparsity.benchmarks.train_step, "
                     "fx_sparsity.benchmarks.inference, fx_sparsity.benchmarks.lowering; "
                     "print('\\n'.join(m.__file__ for n, m in sys.modules.items() if n.startswith('fx_sparsity')))")
    assert proc.returncode == 0, proc.stderr
    files = proc.stdout.split()
    assert len(files) > 10 and all(f.startswith(str(site)) for f in files), proc.stdout  # all from the wheel
    proc = run("-m", "fx_sparsity", "bench", "--quick", "--cases", "prepare")
    assert proc.returncode == 0, proc.stderr
    assert "## prepare" in proc.stdout and "10 Linear layers" in proc.stdout


def test_semi_structured_benchmark_runs_on_the_cpu_and_says_why_2_4_is_refused(tmp_path, capsys):
    """The GPU benchmark's code, on the CPU: every row timed, 2:4 refused with its reason, auto's choice recorded."""
    from fx_sparsity.benchmarks import semi_structured

    out = tmp_path / "ss.json"
    assert semi_structured.main(["--device", "cpu", "--quick", "--sizes", "64x128", "--tokens", "1,8",
                                 "--train", "none", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["linear"]
    assert [(r["dtype"], r["weight"], r["tokens"]) for r in rows] == [
        ("float16", "64x128", 1), ("float16", "64x128", 8), ("bfloat16", "64x128", 1), ("bfloat16", "64x128", 8)]
    for row in rows:
        assert row["two_four_ms"] is None and row["auto_picked"] == "dense" and row["dense_ms"] > 0
        assert row["two_four_refused"] == "'0.weight': the 2:4 kernels run on CUDA only, the weight is on cpu"
    assert "auto picked a sparse kernel in 0 of 4 rows" in capsys.readouterr().out


def test_gpu_check_runs_every_cuda_test():
    """tools/gpu_check.sh names the test files to run on the GPU: every file with a `cuda` test must be among them."""
    script = open(os.path.join(ROOT, "tools", "gpu_check.sh"), encoding="utf-8").read()
    tests = os.path.join(ROOT, "tests")
    marked = re.compile(r"^(@pytest\.mark\.cuda|pytestmark = .*pytest\.mark\.cuda)", re.MULTILINE)
    with_cuda = {f"tests/{name}" for name in os.listdir(tests) if name.endswith(".py")
                 and marked.search(open(os.path.join(tests, name), encoding="utf-8").read())}
    assert with_cuda == {"tests/test_cuda.py", "tests/test_semi_structured.py"}
    assert all(f" {path}" in script for path in with_cuda)

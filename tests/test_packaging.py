"""The project's import names belong to it alone, whatever its dependencies install.

transformers >= 5.25 requires Hugging Face's `kernels` distribution and imports it when a
tokenizer or model loads. A top-level package of ours with a name that another distribution
provides shadows that distribution from the repo root (the working directory comes first on
sys.path) and is shadowed by it elsewhere. These tests run in the environment `make test`
builds, which holds the newest releases.
"""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIST = "vine-engine"


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def _project_top_level_names() -> set[str]:
    """Top-level names the installed distribution provides, plus packages importable from the repo root."""
    dist = importlib.metadata.distribution(DIST)
    names = {line.strip() for line in (dist.read_text("top_level.txt") or "").splitlines() if line.strip()}
    names |= {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}  # e.g. bench (python -m bench.x)
    return names


def test_the_installed_distribution_provides_engine() -> None:
    assert "engine" in _project_top_level_names()
    assert not (ROOT / "kernels").exists(), "the kernels live in engine/kernels: `kernels` is Hugging Face's name"


def test_no_top_level_name_is_shared_with_another_distribution() -> None:
    owners = importlib.metadata.packages_distributions()
    shared = {name: sorted(set(owners[name]) - {DIST}) for name in _project_top_level_names()
              if set(owners.get(name, [])) - {DIST}}
    assert not shared, f"top-level names also provided by other installed distributions: {shared}"
    for name in _project_top_level_names() & set(owners):
        assert set(owners[name]) == {DIST}, (name, owners[name])


def test_transformers_hub_kernels_imports_from_the_repo_root() -> None:
    """The import transformers makes when a tokenizer or model loads; it failed while `kernels` was ours."""
    r = _run("import transformers.integrations.hub_kernels", cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("where", ["repo root", "elsewhere"])
def test_engine_kernels_is_ours_from_any_directory(where: str, tmp_path: Path) -> None:
    cwd = ROOT if where == "repo root" else tmp_path
    r = _run("import importlib, engine.kernels as k; m = importlib.import_module('engine.kernels.fused_logprobs'); "
             "print(m.__file__); assert callable(k.fused_logprobs)", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip()).resolve() == ROOT / "engine" / "kernels" / "fused_logprobs.py"


def test_the_aot_compile_child_runs_from_the_folder_that_holds_engine() -> None:
    """`run_scenarios` starts `python -m engine.kernels.aot` there with PYTHONPATH set to it: the
    package's parent, not the package (which would also expose engine/kernels as `kernels`)."""
    r = _run("from engine.kernels import aot; print(aot.PACKAGE_ROOT)", cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    root = Path(r.stdout.strip())
    assert root == ROOT and (root / "engine" / "kernels" / "aot.py").is_file() and not (root / "kernels").exists()


def test_the_kernels_import_nothing_else_from_engine() -> None:
    """engine/kernels stands alone: importing it loads no other part of the package."""
    r = _run("import sys, engine.kernels, engine.kernels.aot\n"
             "print(' '.join(sorted(m for m in sys.modules if m.startswith('engine'))))", cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = set(r.stdout.split())
    others = {m for m in loaded if m != "engine" and not m.startswith("engine.kernels")}
    assert not others, f"importing engine.kernels loaded {sorted(others)}"
    assert "engine.kernels.fused_logprobs" in loaded


@pytest.mark.parametrize("where", ["repo root", "elsewhere"])
def test_the_smoke_preset_runs_from_any_directory(where: str, tmp_path: Path) -> None:
    """`python -m engine.train --preset smoke` as a user runs it (made small): it loads a tokenizer and
    a model through transformers, the Triton kernels and the trainer, in a fresh interpreter."""
    from test_train_cli import SMALL  # the CLI tests' tiny model and budget

    cwd = ROOT if where == "repo root" else tmp_path
    r = subprocess.run([sys.executable, "-m", "engine.train", "--preset", "smoke", "--run-dir", str(tmp_path / "run"),
                        *SMALL], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "final" / "config.json").is_file()

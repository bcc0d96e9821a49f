"""Build hook: ``pip install -e .`` also builds the native CUTLASS library when nvcc is present.

The library (``backends/cutlass/libqfx_cutlass.so`` + its manifest) is configured and built with
CMake (CMakeLists.txt) from the kernel-config table backends/cutlass/configs.py. Without nvcc
the package installs anyway and the "cutlass" backend reports itself unavailable.

Environment:
    QFX_CUDA_ARCHS   CUDA archs to build, default "80;86;89;90a"
    QFX_SKIP_NATIVE  "1": do not build the native library
    QFX_BUILD_JOBS   parallel compile jobs (default: all cores)

pip shows the build's messages (and its time) with ``pip install -v -e .``; the time is also
written to build/native/build_time.txt.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;86;89;90a"
LIB_DIR = ROOT / "backends" / "cutlass"
BUILD_DIR = ROOT / "build" / "native"


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _find_cmake() -> str:
    found = shutil.which("cmake")
    if found:
        return found
    try:  # the "cmake" PyPI package, if the build environment has it
        import cmake  # type: ignore[import-not-found]

        return str(Path(cmake.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        raise RuntimeError("qfx: nvcc found but no cmake (>= 3.24): install cmake, or set "
                           "QFX_SKIP_NATIVE=1 to install without the CUTLASS library") from None


def _cached_generator() -> str | None:
    cache = BUILD_DIR / "CMakeCache.txt"
    if not cache.exists():
        return None
    for line in cache.read_text().splitlines():
        if line.startswith("CMAKE_GENERATOR:INTERNAL="):
            return line.split("=", 1)[1]
    return None


def build_native() -> None:
    """Configure and build the native library into backends/cutlass/ (skips without nvcc)."""
    if os.environ.get("QFX_SKIP_NATIVE") == "1":
        print("qfx: QFX_SKIP_NATIVE=1: not building the native CUTLASS library")
        return
    nvcc = _find_nvcc()
    if nvcc is None:
        print("qfx: nvcc not found (PATH, CUDA_HOME): installing WITHOUT the native CUTLASS "
              "library; the 'cutlass' backend will report itself unavailable and the CPU "
              "reference backend still works. Install the CUDA toolkit and re-run "
              "`pip install -e .` to build it.")
        return
    archs = os.environ.get("QFX_CUDA_ARCHS", DEFAULT_ARCHS)
    jobs = os.environ.get("QFX_BUILD_JOBS", str(os.cpu_count() or 1))
    cmake = _find_cmake()
    configure = [cmake, "-S", str(ROOT), "-B", str(BUILD_DIR), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DPython3_EXECUTABLE={sys.executable}",
                 f"-DQFX_CUDA_ARCHS={archs}", f"-DQFX_OUTPUT_DIR={LIB_DIR}"]
    ninja = shutil.which("ninja")
    generator = "Ninja" if ninja else "Unix Makefiles"
    if _cached_generator() not in (None, generator):  # cmake cannot switch generators in place
        shutil.rmtree(BUILD_DIR)
    configure += ["-G", generator]
    if ninja:  # pip's isolated build env lives in a new temp dir each time: re-point the cache
        configure.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
    start = time.time()
    print(f"qfx: building the native CUTLASS library for {archs} with {jobs} jobs ...",
          flush=True)
    subprocess.check_call(configure)
    subprocess.check_call([cmake, "--build", str(BUILD_DIR), "--parallel", jobs])
    seconds = time.time() - start
    (BUILD_DIR / "build_time.txt").write_text(f"{seconds:.0f} s for QFX_CUDA_ARCHS={archs}, "
                                              f"{jobs} jobs\n")
    print(f"qfx: native CUTLASS library built in {seconds:.0f} s -> {LIB_DIR}", flush=True)


class BuildPyWithNative(build_py):
    """build_py (also run by editable installs) that first builds the native library."""

    def run(self):
        build_native()
        super().run()


setup(cmdclass={"build_py": BuildPyWithNative})

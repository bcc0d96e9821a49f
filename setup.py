"""Build hook: ``pip install -e .`` also builds the native CUTLASS library when nvcc is present.

The library (``backends/cutlass/libqfx_cutlass.so`` + its manifest) is configured and built with
CMake (CMakeLists.txt) from the kernel-config table backends/cutlass/configs.py. Without nvcc
the package installs anyway and the "cutlass" backend reports itself unavailable.

The build needs nvcc and runs only where an NVIDIA GPU is visible (``nvidia-smi -L`` lists one, or
a ``/dev/nvidia<N>`` device exists): on a CPU-only machine it would take ~13 min on 2 cores (two archs) for
kernels nothing there can run, so the install says so and skips it (``QFX_BUILD_NATIVE=1`` builds
anyway, e.g. on a GPU-less build node for GPU machines that share the checkout).

Environment:
    QFX_CUDA_ARCHS    CUDA archs to build, default "80;86;89;90a"
    QFX_SKIP_NATIVE   "1": do not build the native library
    QFX_BUILD_NATIVE  "1": build it even where no GPU is visible
    QFX_BUILD_JOBS    parallel compile jobs (default: all cores)

Under a plain ``pip install`` (which hides a build's output) qfx says up front how long the
build takes and how to skip it, then shows its progress, on the terminal (``/dev/tty``, which
pip does not capture) when there is one; ``pip install -v -e .`` shows every compiler line.
The time is written to build/native/build_time.txt and is the next estimate.
"""
from __future__ import annotations

import os
import re
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


def _gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU: ``nvidia-smi -L`` lists one, or a device node exists."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            listed = ""
        if "GPU " in listed:
            return True
    return any(Path("/dev").glob("nvidia[0-9]*"))


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


def _say(msg: str) -> None:
    """Print ``msg`` to the build log and to the user's terminal: pip captures a build's
    stdout/stderr (shown only with -v), not /dev/tty."""
    print(msg, flush=True)
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(msg + "\n")
    except OSError:  # no terminal (CI, IDE): the log line is all there is
        pass


def _estimate_s(archs: str, jobs: str) -> tuple[float, str]:
    """Seconds the build will take: the last build's time when known, else a fit to measured
    builds of ``80;90a`` (~90 s with 16 jobs on the H100 hosts, ~13 min with 2 on a 2-core CI
    machine; ~12 core-minutes per arch), scaled by the number of archs."""
    last = BUILD_DIR / "build_time.txt"
    if last.exists():  # "181 s for QFX_CUDA_ARCHS=80;86;89;90a, 2 jobs"
        text = last.read_text()
        if f"QFX_CUDA_ARCHS={archs}," in text and f" {jobs} jobs" in text:
            try:
                return float(text.split()[0]), "the last full build here; less when it is up to date"
            except (ValueError, IndexError):
                pass
    n_archs = max(len([a for a in archs.split(";") if a.strip()]), 1)
    return (5 + 720 / max(int(jobs), 1)) * n_archs / 2, f"estimate for {jobs} jobs"


#: a build step's progress as ninja ("[12/48] ...") or make ("[ 25%] ...") prints it
_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]")
_MAKE_STEP = re.compile(r"^\[\s*(\d+)%\]")


def _build_with_progress(cmd: list[str], start: float) -> None:
    """Run the build, copying its output to the log and reporting each new 10 % on the terminal."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    shown = -1
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="", flush=True)
        if m := _NINJA_STEP.match(line):
            pct = 100 * int(m.group(1)) // max(int(m.group(2)), 1)
        elif m := _MAKE_STEP.match(line):
            pct = int(m.group(1))
        else:
            continue
        if pct // 10 > shown:
            shown = pct // 10
            _say(f"qfx: native build {pct:3d} % ({time.time() - start:.0f} s)")
    if proc.wait() != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd)


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
    if os.environ.get("QFX_BUILD_NATIVE") != "1" and not _gpu_visible():
        eta, _ = _estimate_s(archs, jobs)
        _say(f"qfx: nvcc found but no NVIDIA GPU visible (nvidia-smi -L, /dev/nvidia*): not building the native "
             f"CUTLASS library (about {eta / 60:.0f} min here) that nothing on this machine could run; the CPU "
             "backends need no native code. To build it anyway (a build node for GPU machines): "
             "QFX_BUILD_NATIVE=1 pip install -e .")
        return
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
    eta, basis = _estimate_s(archs, jobs)
    _say(f"qfx: building the native CUTLASS library for {archs} with {jobs} jobs: about "
         f"{eta / 60:.0f} min ({basis}). To skip it: QFX_SKIP_NATIVE=1 pip install -e . "
         "(the CPU reference backend needs no native code); fewer archs: QFX_CUDA_ARCHS=90a")
    subprocess.check_call(configure, stdout=sys.stdout, stderr=sys.stderr)
    _build_with_progress([cmake, "--build", str(BUILD_DIR), "--parallel", jobs], start)
    seconds = time.time() - start
    (BUILD_DIR / "build_time.txt").write_text(f"{seconds:.0f} s for QFX_CUDA_ARCHS={archs}, "
                                              f"{jobs} jobs\n")
    _say(f"qfx: native CUTLASS library built in {seconds:.0f} s -> {LIB_DIR}")


class BuildPyWithNative(build_py):
    """build_py (also run by editable installs) that first builds the native library."""

    def run(self):
        build_native()
        super().run()


setup(cmdclass={"build_py": BuildPyWithNative})

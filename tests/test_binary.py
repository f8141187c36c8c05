"""The single-file executable `dist/morph`, run as a user would run it.

Built by `python3 -m morph._bundle.build` (`.ci/binary` builds it, then runs this file with
MORPH_BINARY_REQUIRED=1). Each run happens in a clean environment (`env -i`: no
PYTHONPATH, no venv, no Python on PATH), from a read-only working directory, with a
fresh HOME, XDG_DATA_HOME and TMPDIR, and checks that it wrote only under the XDG data dir.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from test_editor_tmux import TMUX, Tmux, type_accept_save

ROOT = Path(__file__).resolve().parents[1]
BINARY = Path(os.environ.get("MORPH_BINARY", ROOT / "dist" / "morph"))
REQUIRED = os.environ.get("MORPH_BINARY_REQUIRED") == "1"

if not BINARY.is_file() and not REQUIRED:
    pytest.skip(f"{BINARY} not built (python3 -m morph._bundle.build)", allow_module_level=True)


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


class Box:
    """A fresh HOME/XDG_DATA_HOME/TMPDIR and a read-only working directory."""

    def __init__(self, tmp: Path):
        self.home, self.tmp, self.cwd = tmp / "home", tmp / "tmp", tmp / "ro"
        self.xdg = self.home / "xdg-data"
        for d in (self.home, self.tmp, self.cwd):
            d.mkdir(parents=True)
        (self.cwd / "input.txt").write_text("hey, can u send me the report by friday? thx\n")
        self.cwd.chmod(0o555)
        self.env = {"HOME": str(self.home), "XDG_DATA_HOME": str(self.xdg), "TMPDIR": str(self.tmp),
                    "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "TERM": "xterm-256color"}
        # One llama.cpp thread, as in every test: on a shared 2-core machine two threads stall.
        self.xdg.joinpath("tinymorph").mkdir(parents=True)
        self.xdg.joinpath("tinymorph", "config.toml").write_text("threads = 1\n")
        self.before = snapshot(tmp)

    def argv(self, *args: str) -> list[str]:
        return ["env", "-i", *(f"{k}={v}" for k, v in self.env.items()), str(BINARY), *args]

    def run(self, *args: str, stdin: bytes = b"", timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(*args), input=stdin, cwd=self.cwd, capture_output=True, timeout=timeout)

    def new_files(self) -> set[str]:
        return snapshot(self.home.parent) - self.before

    def data(self) -> Path:
        return self.xdg / "tinymorph"


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    b = Box(tmp_path_factory.mktemp("binary"))
    yield b
    b.cwd.chmod(0o755)


def test_binary_is_one_self_contained_file():
    assert BINARY.stat().st_size > 100e6  # Python, llama.cpp, the model, the vectors
    out = subprocess.run(["ldd", str(BINARY)], capture_output=True, text=True).stdout
    libs = {ln.split()[0] for ln in out.splitlines() if ln.strip()}
    assert not any("python" in lib or "llama" in lib or "ggml" in lib for lib in libs), libs


def test_steer_and_features_from_a_clean_environment(box):
    r = box.run("--version")
    assert r.returncode == 0 and b"morph" in r.stdout
    assert b"unpacking the embedded model" in r.stderr  # the first run, whatever the command
    first = box.run("steer", "-f", "formal", "--max-tokens", "24", "--temperature", "0",
                    stdin=(box.cwd / "input.txt").read_bytes())
    assert first.returncode == 0, first.stderr.decode()
    assert len(first.stdout.decode().strip()) > 10
    again = box.run("steer", "-f", "formal", "--max-tokens", "24", "--temperature", "0",
                    stdin=(box.cwd / "input.txt").read_bytes())
    assert again.returncode == 0 and again.stdout == first.stdout  # greedy: the same text
    assert b"unpacking" not in again.stderr
    feats = box.run("features", "list")
    assert feats.returncode == 0
    names = {ln.split()[0] for ln in feats.stdout.decode().splitlines()}
    assert {"formal", "concise", "casual"} <= names
    # Only the XDG data dir changed: PyInstaller's per-run temp dir is gone, cwd untouched.
    new = box.new_files()
    outside = {p for p in new if not p.startswith("home/xdg-data")}
    assert outside <= {"home/xdg-data"}, sorted(outside)[:10]
    assert not list(box.tmp.iterdir()) and sorted(p.name for p in box.cwd.iterdir()) == ["input.txt"]


def test_bad_input_is_one_error_line(box):
    for args, stdin in ((["steer", "-f", "formal"], b"\xff\xfe not utf-8"),
                        (["steer", "-f", "nosuchfeature"], b"hello"),
                        (["steer", "--vector", "/nonexistent.gguf"], b"hello")):
        r = box.run(*args, stdin=stdin)
        err = r.stderr.decode()
        assert r.returncode == 1 and err.startswith("morph: error: ") and err.count("\n") == 1, err
        assert "Traceback" not in err


def test_doctor_from_a_clean_environment(box):
    """The frozen executable runs doctor's generation in a child of itself, on the CPU
    variant ggml chose, and leaves no crash file behind."""
    r = box.run("doctor", "--json")
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    checks = {c["name"]: c for c in json.loads(r.stdout)["checks"]}
    assert "the portable build's variant" in checks["llama.cpp"]["details"]["backend"]
    assert checks["model"]["status"] == "ok" and checks["generation"]["details"]["tokens"] > 1
    assert not list((box.data() / "crash").glob("run-*.log"))


def test_cpu_backend_fallback_and_clear_error(box):
    """The baseline x86-64 variant alone still runs; no usable variant at all is one error line."""
    box.run("features", "list")  # unpacked
    [bundle] = [p for p in (box.data() / "bundle").iterdir() if not p.name.startswith(".")]
    ggml = bundle / "ggml"
    variants = sorted(p.name for p in ggml.glob("libggml-cpu-*.so"))
    assert "libggml-cpu-x64.so" in variants and len(variants) >= 8, variants
    keep = ggml.parent / "ggml-all"
    shutil.copytree(ggml, keep)
    try:
        for p in ggml.glob("libggml-cpu-*.so"):
            if p.name != "libggml-cpu-x64.so":
                p.unlink()
        r = box.run("steer", "--max-tokens", "8", "--temperature", "0", "--mode", "continue", stdin=b"The sea was")
        assert r.returncode == 0 and r.stdout.strip(), r.stderr.decode()
        (ggml / "libggml-cpu-x64.so").unlink()
        r = box.run("steer", "--max-tokens", "8", "--mode", "continue", stdin=b"The sea was")
        err = r.stderr.decode()
        assert r.returncode == 1 and "morph: error: no llama.cpp CPU backend" in err and err.count("\n") == 1, err
    finally:
        shutil.rmtree(ggml)
        keep.rename(ggml)


@pytest.fixture()
def tmux(box, tmp_path):
    if TMUX is None:
        pytest.skip("tmux is not installed")
    (box.data()).mkdir(parents=True, exist_ok=True)
    (box.data() / "config.toml").write_text("threads = 1\n[editor]\nsuggestion_tokens = 10\ndebounce_ms = 150\n")
    t = Tmux(tmp_path, {"TERM": "xterm-256color"})
    yield t
    t.close()


def test_repl_in_tmux(tmux, box):
    s = tmux.start(*box.argv("repl", "--temperature", "0", "--max-tokens", "8"))
    tmux.wait_screen(s, lambda scr: any(ln.rstrip() == ">" for ln in scr.splitlines()), 60, "the prompt")
    tmux.type(s, "Name a colour.")
    tmux.send(s, "Enter")
    def answered(scr):
        lines = [ln.rstrip() for ln in scr.splitlines()]
        i = next((k for k, ln in enumerate(lines) if ln == "> Name a colour."), None)
        return i is not None and lines[i + 1:i + 2] != [""] and ">" in lines[i + 2:]

    tmux.wait_screen(s, answered, 60, "a reply and a new prompt")
    tmux.send(s, "C-d")
    tmux.wait_exit(s)


def test_write_in_tmux(tmux, box, tmp_path):
    doc = tmp_path / "story.md"
    typed = "The weather today is"
    shown = type_accept_save(tmux, box.argv("write", str(doc)), typed, wait_s=60)
    text = doc.read_text(encoding="utf-8")
    assert text.startswith(shown) and len(text) > len(typed) + 2


BUNDLE_PYTHON = Path(os.environ.get("MORPH_BUNDLE_PYTHON", ROOT / "build" / "bundle-venv" / "bin" / "python"))
OLD_CPU = r"""
import os, sys
sys.path.insert(0, os.environ["ROOT"])
from morph import models
from morph.engine.base import Request
from morph.engine.llama import LlamaEngine
eng = LlamaEngine(models.check(models.resolve(None)), n_ctx=256, threads=1)
text = "".join(ev.text or "" for ev in eng.stream(Request(prompt="The sea was", max_tokens=4, temperature=0)))
maps = open("/proc/self/maps").read()
print(sorted({l.rsplit("/", 1)[-1] for l in maps.splitlines() if "libggml-cpu" in l}), repr(text))
"""


@pytest.mark.skipif(shutil.which("qemu-x86_64") is None or not BUNDLE_PYTHON.is_file(),
                    reason="needs qemu-user and the build venv (build/bundle-venv)")
@pytest.mark.parametrize("cpu,variant", [("Nehalem", "sse42"), ("qemu64", "x64")])
def test_portable_build_on_an_older_cpu(cpu, variant):
    """The libraries inside dist/morph (the build venv's: the same wheels) on emulated older
    CPUs: Nehalem (x86-64-v2, no AVX) and qemu64 (plain x86-64 with SSE3, the floor); ggml
    picks the variant that fits and the text is generated. The executable itself cannot
    run under qemu-user: its bootloader re-executes itself, natively."""
    env = dict(os.environ, ROOT=str(ROOT))
    r = subprocess.run(["qemu-x86_64", "-cpu", cpu, str(BUNDLE_PYTHON), "-c", OLD_CPU],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"['libggml-cpu-{variant}.so'] '") and len(r.stdout.strip()) > 30, r.stdout

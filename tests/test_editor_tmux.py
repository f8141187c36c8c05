"""`morph write` as a person uses it: the real app and the real model in tmux.

A private tmux server (its own socket), a fixed 100x24 screen, keys sent with send-keys,
the screen read with capture-pane and polled with timeouts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TMUX = shutil.which("tmux") or ("/usr/bin/tmux" if os.path.exists("/usr/bin/tmux") else None)
pytestmark = [pytest.mark.tmux, pytest.mark.skipif(TMUX is None, reason="tmux is not installed")]


class Tmux:
    def __init__(self, tmp_path: Path, env: dict, width: int = 100, height: int = 24):
        self.socket = f"morph-test-{os.getpid()}-{id(self)}"
        self.env = env
        self.size = (width, height)
        self.n = 0

    def _tmux(self, *args, check=True) -> str:
        r = subprocess.run([TMUX, "-L", self.socket, *args], capture_output=True, text=True, timeout=10)
        if check and r.returncode != 0:
            raise RuntimeError(f"tmux {args[0]}: {r.stderr.strip()}")
        return r.stdout

    def start(self, *argv: str) -> str:
        self.n += 1
        name = f"s{self.n}"
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        cmd = "exec env " + env + " " + " ".join(_q(a) for a in argv)
        self._tmux("new-session", "-d", "-s", name, "-x", str(self.size[0]), "-y", str(self.size[1]), cmd)
        return name

    def send(self, name: str, *keys: str) -> None:
        self._tmux("send-keys", "-t", name, *keys)

    def type(self, name: str, text: str) -> None:
        self._tmux("send-keys", "-t", name, "-l", text)

    def screen(self, name: str) -> str:
        return self._tmux("capture-pane", "-p", "-t", name, check=False)

    def pid(self, name: str) -> int:
        return int(self._tmux("display-message", "-p", "-t", name, "#{pane_pid}").strip())

    def alive(self, name: str) -> bool:
        return subprocess.run([TMUX, "-L", self.socket, "has-session", "-t", name],
                              capture_output=True).returncode == 0

    def wait_screen(self, name: str, pred, timeout: float, what: str) -> str:
        end = time.monotonic() + timeout
        scr = ""
        while time.monotonic() < end:
            scr = self.screen(name)
            if pred(scr):
                return scr
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; screen:\n{scr}")

    def wait_exit(self, name: str, timeout: float = 15) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.alive(name):
                return
            time.sleep(0.1)
        raise AssertionError(f"app did not exit; screen:\n{self.screen(name)}")

    def close(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True)


def _q(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


@pytest.fixture()
def tmux(tmp_path, data_dir):
    data_dir.mkdir(parents=True, exist_ok=True)
    # Short suggestions keep the test quick on a busy 2-core machine.
    (data_dir / "config.toml").write_text("[editor]\nsuggestion_tokens = 10\ndebounce_ms = 150\n")
    env = {"MORPH_DATA_DIR": str(data_dir), "TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"}
    t = Tmux(tmp_path, env)
    yield t
    t.close()


def morph_write(path: Path) -> list[str]:
    return [sys.executable, "-m", "morph", "write", str(path)]


def status_line(screen: str) -> str:
    lines = screen.rstrip("\n").split("\n")
    return next((ln for ln in reversed(lines) if ln.startswith((" NORMAL ", " INSERT "))), "")


def type_accept_save(tmux, argv: list[str], typed: str, wait_s: float = 30) -> str:
    """Start the editor, type, wait for ghost text, accept it (Tab), :wq. Returns the first
    screen line as it was while the ghost text showed."""
    s = tmux.start(*argv)
    tmux.wait_screen(s, lambda scr: "NORMAL" in scr, wait_s, "the editor")
    tmux.send(s, "i")
    tmux.type(s, typed)
    # Ghost text: the first screen line grows past what was typed, the buffer does not.
    scr = tmux.wait_screen(s, lambda scr: len(scr.split("\n")[0].rstrip()) > len(typed) + 2, 2 * wait_s,
                           "ghost text")
    assert scr.split("\n")[0].startswith(typed)
    assert "[+]" in status_line(scr)
    tmux.send(s, "Tab")
    tmux.wait_screen(s, lambda scr: "TTFT" in status_line(scr), 30, "timing in the status bar")
    tmux.send(s, "Escape")
    tmux.wait_screen(s, lambda scr: "NORMAL" in status_line(scr), 10, "normal mode")
    tmux.type(s, ":wq")
    tmux.send(s, "Enter")
    tmux.wait_exit(s)
    return scr.split("\n")[0].rstrip()


def test_type_wait_for_ghost_accept_and_save(tmux, tmp_path):
    doc = tmp_path / "story.md"
    typed = "The weather today is"
    shown = type_accept_save(tmux, morph_write(doc), typed)
    text = doc.read_text(encoding="utf-8")
    assert text.startswith(shown)  # what was on screen was accepted (it may have grown since)
    assert len(text) > len(typed) + 2


def test_kill_9_mid_edit_then_recover(tmux, tmp_path, data_dir):
    doc = tmp_path / "notes.md"
    doc.write_text("Saved line.\n", encoding="utf-8")
    s = tmux.start(*morph_write(doc))
    tmux.wait_screen(s, lambda scr: "NORMAL" in scr, 30, "the editor")
    tmux.send(s, "A")
    tmux.type(s, " Unsaved words here.")
    tmux.wait_screen(s, lambda scr: "Unsaved words here." in scr, 10, "typed text")
    # The draft is mirrored after a change (within 2 s as the editor schedules it:
    # test_editor.py checks the delay it asks for); the wait only ends a test whose mirror
    # never comes, however busy the machine.
    rec_dir = data_dir / "recovery"

    def mirrored() -> bool:
        files = list(rec_dir.glob("*.json"))
        return bool(files) and "Unsaved words here." in json.loads(files[0].read_text())["text"]

    deadline = time.monotonic() + 60
    while not mirrored():
        assert time.monotonic() < deadline, "no recovery file with the typed text"
        time.sleep(0.05)
    os.kill(tmux.pid(s), signal.SIGKILL)
    tmux.wait_exit(s)
    assert doc.read_text() == "Saved line.\n"  # the crash wrote nothing to the file

    s2 = tmux.start(*morph_write(doc))
    tmux.wait_screen(s2, lambda scr: "[r]estore" in scr, 30, "the recovery question")
    tmux.send(s2, "r")
    scr = tmux.wait_screen(s2, lambda scr: "Unsaved words here." in scr, 10, "restored text")
    assert "[+]" in status_line(scr)
    tmux.send(s2, "Escape")
    tmux.type(s2, ":wq")
    tmux.send(s2, "Enter")
    tmux.wait_exit(s2)
    assert doc.read_text().startswith("Saved line. Unsaved words here.")
    assert not list(rec_dir.glob("*.json"))  # gone after a clean save and quit


def test_a_feature_the_catalog_lacks_is_one_error_line_after_the_document_shows(tmux, tmp_path):
    """The model (and the catalog) load after the first paint; `-f` naming no feature still
    ends `morph write` with one error line and status 1, the file untouched."""
    doc = tmp_path / "notes.md"
    doc.write_text("Keep this text.\n")
    err, rc = tmp_path / "err", tmp_path / "rc"
    cmd = " ".join(_q(a) for a in morph_write(doc) + ["-f", "nosuchfeature"])
    s = tmux.start("sh", "-c", f"{cmd} 2>{_q(str(err))}; echo $? >{_q(str(rc))}")
    tmux.wait_exit(s, timeout=60)
    assert rc.read_text().strip() == "1"
    lines = err.read_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("morph: error:") and "nosuchfeature" in lines[0], lines
    assert doc.read_text() == "Keep this text.\n"


def test_alt_bracket_shows_another_alternative_and_tab_accepts_it(tmux, tmp_path):
    """After the suggestion, its alternatives (decoded by the real model in one batch) are
    counted in the status bar; Alt-] puts the next one on screen and Tab takes that one."""
    doc = tmp_path / "alts.md"
    typed = "The weather today is"
    s = tmux.start(*morph_write(doc))
    tmux.wait_screen(s, lambda scr: "NORMAL" in scr, 30, "the editor")
    tmux.send(s, "i")
    tmux.type(s, typed)
    scr = tmux.wait_screen(s, lambda scr: "Alt-] 1/" in status_line(scr), 90, "alternatives ready")
    first = scr.split("\n")[0].rstrip()
    assert first.startswith(typed) and len(first) > len(typed) + 2
    tmux.send(s, "M-]")
    scr = tmux.wait_screen(s, lambda scr: "Alt-] 2/" in status_line(scr), 10, "the next alternative")
    second = scr.split("\n")[0].rstrip()
    assert second.startswith(typed) and second != first
    tmux.send(s, "Tab")
    tmux.wait_screen(s, lambda scr: "Alt-]" not in status_line(scr), 10, "accepted")
    tmux.send(s, "Escape")
    tmux.wait_screen(s, lambda scr: "NORMAL" in status_line(scr), 10, "normal mode")
    tmux.type(s, ":wq")
    tmux.send(s, "Enter")
    tmux.wait_exit(s)
    assert doc.read_text(encoding="utf-8").startswith(second)

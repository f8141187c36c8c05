"""State under $XDG_DATA_HOME/tinymorph: created on first use, config honoured, WAL history."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import stat
import subprocess
import sys

import pytest

from morph import config, fsutil, paths, store


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k != "MORPH_DATA_DIR"}
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    env.update(extra)
    return env


def test_xdg_data_home_is_honoured_and_created_on_first_use(tmp_path):
    root = tmp_path / "xdg" / "tinymorph"
    assert not root.exists()
    r = subprocess.run([sys.executable, "-m", "morph", "log", "--path"], capture_output=True, env=_env(tmp_path))
    assert r.returncode == 0 and r.stdout.decode().strip() == str(root / "morph.db")
    assert root.is_dir()


def test_config_defaults_features_and_threads(tmp_path):
    env = _env(tmp_path)
    root = tmp_path / "xdg" / "tinymorph"
    root.mkdir(parents=True)
    (root / "config.toml").write_text('threads = 1\n[features]\n"formal@sae" = 0.15\n')
    r = subprocess.run([sys.executable, "-m", "morph", "steer", "--experimental", "--temperature", "0",
                        "--max-tokens", "4"],
                       input=b"see you tomorrow", capture_output=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    db = sqlite3.connect(str(root / "morph.db"))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    feats = json.loads(db.execute("SELECT features FROM runs").fetchone()[0])
    assert feats == {"formal@sae": 0.15}  # config's [features] apply when -f gives none


def test_config_file_written_with_comments_and_bad_toml_warns(data_dir, capsys):
    cfg = config.load_config()
    assert cfg.n_ctx == 4096 and cfg.features == {}
    text = paths.config_path().read_text()
    assert "threads" in text and "[features]" in text
    paths.config_path().write_text("model = [unclosed")
    cfg = config.load_config()
    assert cfg.model is None
    assert "ignoring" in capsys.readouterr().err


def test_migrations_are_idempotent(data_dir):
    db = store.connect()
    v = db.execute("PRAGMA user_version").fetchone()[0]
    assert v == len(store.MIGRATIONS)
    store.log_run(db, "steer", "smollm2", {"formal": 0.2}, "rewrite", "in", "out", "stop", {"ttft_s": 0.1})
    db.close()
    db = store.connect()
    assert db.execute("PRAGMA user_version").fetchone()[0] == v
    assert [r["output"] for r in store.recent_runs(db)] == ["out"]


# --- atomic writes (fsutil) -----------------------------------------------------------------


@pytest.fixture()
def fsyncs(monkeypatch):
    """The path of every descriptor os.fsync is called on, in order."""
    calls = []
    real = os.fsync

    def record(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def _write_replacing(path, text):
    with fsutil.replacing(path) as tmp:
        tmp.write_text(text)


def _write_atomic(path, text):
    fsutil.atomic_write(path, text.encode())


@pytest.mark.parametrize("writer", [_write_replacing, _write_atomic, lambda p, t: fsutil.write_json(p, json.loads(t))])
def test_writers_fsync_the_data_before_the_rename_and_the_directory_after(tmp_path, fsyncs, writer):
    target = tmp_path / "out.json"
    target.write_text('"old"\n')
    seen = []
    real_replace = os.replace
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", lambda a, b: (seen.append(list(fsyncs)), real_replace(a, b)))
        writer(target, '"new"')
    [before_rename] = seen
    assert len(before_rename) == 1 and os.path.basename(before_rename[0]).startswith(".out.json.")
    assert fsyncs == [before_rename[0], str(tmp_path)]  # then the directory, for the rename
    assert json.loads(target.read_text()) == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "features.json"
    target.write_text("old\n")
    os.chmod(target, 0o640)
    with pytest.raises(RuntimeError):
        with fsutil.replacing(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        fsutil.write_json(target, {"new": 1})
    assert target.read_text() == "old\n" and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["features.json"]  # no temp file left
    monkeypatch.undo()
    link = tmp_path / "link.json"
    link.symlink_to(target.name)
    fsutil.write_json(link, {"new": 1})  # written through the link, mode kept
    assert link.is_symlink() and json.loads(target.read_text()) == {"new": 1}
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


NO_USER = "~nosuchuser-morph"


@pytest.mark.parametrize("args,env", [
    (["write", f"{NO_USER}/x.md"], {}),
    (["history", f"{NO_USER}/x.md"], {}),
    (["--model", f"{NO_USER}/m.gguf", "steer"], {}),
    (["--data-dir", f"{NO_USER}/d", "models"], {}),
    (["models"], {"MORPH_DATA_DIR": f"{NO_USER}/d"}),
], ids=["write", "history", "--model", "--data-dir", "MORPH_DATA_DIR"])
def test_unknown_users_home_is_one_error_line(tmp_path, args, env):
    """pathlib's expanduser raises RuntimeError for ~nosuchuser: one `morph: error:` line."""
    res = subprocess.run([sys.executable, "-m", "morph", *args], input="hi", capture_output=True, text=True,
                         env=_env(tmp_path, **env), timeout=120)
    assert res.returncode == 1 and res.stdout == "", res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(f"morph: error: {NO_USER}/"), res.stderr
    assert "cannot expand '~'" in res.stderr

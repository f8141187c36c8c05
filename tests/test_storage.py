"""State under $XDG_DATA_HOME/tinymorph: created on first use, config honoured, WAL history."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

from morph import config, paths, store


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
    (root / "config.toml").write_text('threads = 1\n[features]\nformal = 0.15\n')
    r = subprocess.run([sys.executable, "-m", "morph", "steer", "--temperature", "0", "--max-tokens", "4"],
                       input=b"see you tomorrow", capture_output=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    db = sqlite3.connect(str(root / "morph.db"))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    feats = json.loads(db.execute("SELECT features FROM runs").fetchone()[0])
    assert feats == {"formal@sae": 0.15}  # a bare name prefers the SAE feature


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

"""Shared fixtures: the real embedded model through the real engine, and a private data dir."""

from __future__ import annotations

import os

import pytest

from morph import models, paths


@pytest.fixture(scope="session")
def model_info():
    return models.check(models.resolve(None))


@pytest.fixture(scope="session")
def engine(model_info):
    """One warm LlamaEngine for the whole session (loading costs ~0.3 s, but contexts add up)."""
    from morph.engine.llama import LlamaEngine

    # One thread: on a shared 2-core machine, 2 llama.cpp threads stall badly under load
    # (FACTS); tests measure correctness, not speed.
    eng = LlamaEngine(model_info, n_ctx=2048, threads=1)
    yield eng
    eng.close()


@pytest.fixture()
def data_dir(tmp_path, monkeypatch):
    """Keep every test out of the user's real $XDG_DATA_HOME/tinymorph."""
    d = tmp_path / "data"
    monkeypatch.setenv("MORPH_DATA_DIR", str(d))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    paths.set_data_dir(None)
    yield d
    paths.set_data_dir(None)


@pytest.fixture(autouse=True, scope="session")
def _no_user_state(tmp_path_factory):
    """Even tests that forget `data_dir` never touch the real data dir."""
    root = tmp_path_factory.mktemp("session-data")
    old = os.environ.get("MORPH_DATA_DIR")
    os.environ["MORPH_DATA_DIR"] = str(root)
    yield
    if old is None:
        os.environ.pop("MORPH_DATA_DIR", None)
    else:
        os.environ["MORPH_DATA_DIR"] = old

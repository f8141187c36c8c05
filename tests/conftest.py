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


@pytest.fixture(scope="session")
def pole_shift_failures():
    """check(engine, {name: Feature}) -> the features that, as real control vectors at their
    default scale, do not raise their own pole's wording over the other pole's on the 8
    held-out contrast pairs the build scored. Empty when every feature steers its way."""
    from morph.steering import diffmean as dm

    def check(engine, feats) -> list:
        failures = []
        for path in sorted(paths.recipes_dir().glob("*.json")):
            r = dm.load_recipe(path)
            test = dm.split_pairs(r)[1][:8]
            base = dm.style_shift(engine, test, None)
            for pole, sign in r.poles:
                f = feats.get(pole["name"])
                if f is not None:
                    steered = dm.style_shift(engine, test, f.load_vector() * f.default_scale)
                    if not sign * (steered - base) > 0:
                        failures.append((f.name, round(base, 4), round(steered, 4)))
        engine.set_steering(None)
        return failures

    return check

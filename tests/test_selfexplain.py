"""Self-explanation sweeps (morph/sae/interpret.py) on the real model, and `morph features explain`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from morph import paths
from morph.errors import MorphError
from morph.sae import interpret
from morph.steering.catalog import Catalog

MODEL_ID = "smollm2-135m-instruct"
SHIPPED = paths.shipped_vectors_dir() / MODEL_ID


def _morph(*args, data_dir=None, timeout=300):
    env = dict(os.environ)
    if data_dir is not None:
        env["MORPH_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, "-m", "morph", *args], capture_output=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def probe(engine):
    return interpret.make_probe(engine, 16)


def test_choose_needs_both_a_rise_and_a_sharper_answer():
    sw = interpret.Sweep([0.0, 1.0, 2.0, 4.0], [0.10, 0.20, 0.30, 0.12], [6.0, 3.0, 6.5, 2.0])
    comp, best = interpret.choose(sw)
    # 1.0: rise 0.1 x drop 0.5; 2.0: entropy rose (0); 4.0: rise 0.02 x drop 0.667
    assert comp[2] == 0.0 and best == 1 and comp[1] == pytest.approx(0.05)
    flat = interpret.Sweep([0.0, 1.0, 3.0, 6.0], [0.1, 0.05, 0.0, -0.1], [6.0, 6.5, 7.0, 7.0])
    comp, best = interpret.choose(flat)
    assert not any(comp) and flat.strengths[best] == interpret.STRENGTH  # the fallback, said so
    flat.composite, flat.chosen = comp, best
    assert flat.fallback
    with pytest.raises(MorphError):
        interpret.check_strengths([1.0, 2.0])  # no strength-0 baseline


def test_sweep_quantities_on_the_real_model(engine, probe):
    """Strength 0 is one prompt for every direction; written into the placeholder, a
    feature's own direction raises the read block's cosine with it as the strength grows,
    random directions do not (measured: concise@diffmean 0.166 -> 0.220 -> 0.230 at 0, 4,
    12; three random directions -0.013..+0.014 at 12). Not every feature does this: on the
    shipped catalog the rise at 12 is -0.035..+0.064, mean +0.008 (formal@sae falls)."""
    cat = Catalog(MODEL_ID, [(SHIPPED, "shipped")])
    f = cat.get("concise@diffmean", experimental=True)
    own = f.load_vector().directions[f.layer]
    rng = np.random.default_rng(0)
    rand = rng.standard_normal((3, engine.n_embd)).astype(np.float32)
    grid = (0.0, 4.0, 12.0)
    sweeps = interpret.sweep(engine, np.concatenate([own[None, :], rand]), probe, grid)
    a, others = sweeps[0], sweeps[1:]
    assert all(s.entropy[0] == a.entropy[0] for s in others)  # the blank word: one prompt for all
    assert all(0.0 < h < np.log(engine.n_vocab) for s in sweeps for h in s.entropy)
    ss = a.self_similarity
    assert ss[2] >= ss[1] > ss[0] and ss[2] - ss[0] > 0.04, ss
    for r in others:
        assert abs(r.self_similarity[2] - r.self_similarity[0]) < 0.03, r.self_similarity
    (again,) = interpret.sweep(engine, own[None, :], probe, grid)  # alone: the same numbers
    assert again.self_similarity == a.self_similarity and again.entropy == a.entropy


def test_features_explain_unknown_name_is_one_error_line():
    r = _morph("features", "explain", "no-such-feature")
    err = r.stderr.decode().strip().splitlines()
    assert r.returncode != 0 and len(err) == 1 and err[0].startswith("morph: error: unknown feature")
    r = _morph("features", "explain", "formal", "--strengths", "1,2")
    assert r.returncode != 0 and r.stderr.decode().startswith("morph: error: ")


def _user_copy(data_dir):
    """The shipped features and SAE as the user's build (so --save writes there)."""
    d = data_dir / "vectors" / MODEL_ID
    d.mkdir(parents=True)
    for p in SHIPPED.iterdir():
        if p.suffix == ".gguf":
            os.symlink(p, d / p.name)
        elif p.name in ("features.json", "sae-L16.evidence.json.gz"):
            shutil.copy(p, d / p.name)
    return d


def test_features_explain_runs_live_and_saves(data_dir):
    _user_copy(data_dir)
    r = _morph("features", "explain", "formal@sae", "--strengths", "0,3", "--json", "--save", data_dir=data_dir)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    live = json.loads(r.stdout)
    assert live["target"] == "formal@sae" and live["strengths"] == [0.0, 3.0]
    assert live["probe"]["read_layer"] == 16 and live["explanation"]
    shown = json.loads(_morph("features", "show", "formal@sae", "--json", data_dir=data_dir).stdout)
    stored = shown["scores"]["self_explanation"]
    assert shown["source"] == "user" and stored["explanation"] == live["explanation"]
    assert stored["strength"] == live["strength"] and stored["entropy"] == live["entropy"]
    j = shown["latents"][0]
    r = _morph("features", "explain", f"latent:{j}", "--strengths", "0,3", "--save", data_dir=data_dir)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    out = r.stdout.decode()
    assert f"latent {j}" in out and "self-sim" in out and "strength 3" in out
    rec = json.loads(_morph("features", "show", str(j), "--json", data_dir=data_dir).stdout)
    assert rec["self_explanation"]["strengths"] == [0.0, 3.0]
    assert rec["explanation"] == rec["self_explanation"]["explanation"]

"""Difference-of-means features: the command, the shipped vectors, and that they steer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from morph import paths, tasks
from morph.engine.base import collect
from morph.steering import diffmean as dm
from morph.steering.catalog import Catalog
from morph.steering.vector import ControlVector

SHIPPED = paths.shipped_vectors_dir() / "smollm2-135m-instruct"


def _diffmean_features():
    cat = Catalog("smollm2-135m-instruct", [(SHIPPED, "shipped")])
    return [f for f in cat.features if f.method == "diffmean"]


def test_recipes_are_complete():
    recipes = sorted(paths.recipes_dir().glob("*.json"))
    assert {r.stem for r in recipes} >= {"formality", "length"}
    for path in recipes:
        r = dm.load_recipe(path)
        assert len(r.pairs) >= 40, path


def test_shipped_diffmean_vectors_validate(engine, model_info):
    feats = _diffmean_features()
    assert {"formal", "casual", "concise", "elaborate"} <= {f.name for f in feats}
    # The median residual norm the vectors are stretched to, measured again on a few
    # held-out texts (the build measured it on the training pairs).
    recipe = dm.load_recipe(paths.recipes_dir() / "formality.json")
    sample = [p[k] for p in dm.split_pairs(recipe)[1][:4] for k in ("positive", "negative")]
    measured = {}
    for f in feats:
        cv = ControlVector.load(f.path)
        cv.validate(model_info.n_embd, model_info.n_layer, where=str(f.path))
        assert cv.layers == [f.layer] and cv.meta["method"] == "diffmean"
        assert 0 < f.default_scale <= 0.5
        if f.layer not in measured:
            measured[f.layer] = float(np.median(dm.text_means(engine, sample, f.layer)[1]))
        assert np.isclose(measured[f.layer], f.residual_norm, rtol=0.1), (f.name, measured[f.layer])
        # Stored at the layer's residual norm, so scales are fractions of it.
        assert np.isclose(np.linalg.norm(cv.directions[f.layer]), f.residual_norm, rtol=1e-3)


@pytest.mark.parametrize("axis", ["formality", "length"])
def test_feature_shifts_heldout_style(engine, axis):
    """Steering with the positive pole raises the log-prob of held-out positive texts
    relative to their negative twins; the negative pole does the opposite. Measured again
    on the held-out pairs the build scored, the shift agrees with the figure it stored."""
    recipe = dm.load_recipe(paths.recipes_dir() / f"{axis}.json")
    by_name = {f.name: f for f in _diffmean_features()}
    pos, neg = by_name[recipe.positive["name"]], by_name[recipe.negative["name"]]
    test = dm.split_pairs(recipe)[1][:pos.scores["heldout_pairs"]]
    base = dm.style_shift(engine, test, None)
    # The stored figures are the build's, at the scale it chose (`morph eval` may have
    # tuned default_scale since; then scores.build_scale keeps the build's).
    up = dm.style_shift(engine, test, pos.load_vector() * pos.scores.get("build_scale", pos.default_scale))
    down = dm.style_shift(engine, test, neg.load_vector() * neg.scores.get("build_scale", neg.default_scale))
    engine.set_steering(None)
    assert up > base + 0.05 and down < base - 0.05, (base, up, down)
    for measured, stored in ((up - base, pos.scores["style_shift_at_default"]),
                             (base - down, neg.scores["style_shift_at_default"])):
        assert abs(measured - stored) <= 0.02 + 0.1 * abs(stored), (axis, measured, stored)


def test_diffmean_command_writes_vectors_and_manifest(tmp_path, data_dir, engine, threads):
    recipe = {
        "axis": "tiny",
        "positive": {"name": "shouty", "description": "All caps."},
        "negative": {"name": "quiet", "description": "Lower case."},
        "pairs": [{"topic": str(i), "positive": p.upper(), "negative": p.lower()} for i, p in enumerate([
            "The train leaves at noon", "Bring the blue folder", "We won the match",
            "Dinner is ready now", "Call me after work"])],
    }
    rp = tmp_path / "tiny.json"
    rp.write_text(json.dumps(recipe))
    (data_dir).mkdir(parents=True, exist_ok=True)
    (data_dir / "config.toml").write_text(f"threads = {threads}\n")
    out = data_dir / "vectors" / "smollm2-135m-instruct"
    out.mkdir(parents=True)
    older = json.dumps({"older": {"layer": 16}}, indent=2) + "\n"
    (out / "diffmean.json").write_text(older)
    env = dict(os.environ, MORPH_DATA_DIR=str(data_dir))
    with open(out / "diffmean.json") as reader:  # a reader that opened the report before
        r = subprocess.run([sys.executable, "-m", "morph", "vectors", "diffmean", str(rp), "--layer", "12"],
                           capture_output=True, env=env, timeout=600)
        assert r.returncode == 0, r.stderr.decode()
        assert reader.read() == older  # still sees the whole old file: replaced, not rewritten in place
    manifest = json.loads((out / "features.json").read_text())
    names = {(e["name"], e["method"]) for e in manifest["features"]}
    assert names == {("shouty", "diffmean"), ("quiet", "diffmean")}
    a = ControlVector.load(out / "shouty.diffmean.gguf")
    b = ControlVector.load(out / "quiet.diffmean.gguf")
    assert np.allclose(a.directions[12], -b.directions[12])
    report = json.loads((out / "diffmean.json").read_text())
    assert report["tiny"]["layer"] == 12 and len(report["tiny"]["sweep"]) >= 2
    assert report["older"] == {"layer": 16}  # other axes' reports are kept
    # The new feature is usable right away, by name and by method: `morph steer` (a fresh
    # process: the whole prompt evaluated, as by the engine after reset_cache, same
    # kernels) prints exactly the engine's continuation under the new vector, which at 0.4
    # is not the unsteered one, and logs the feature and scale it resolved.
    default = next(e["default_scale"] for e in manifest["features"] if e["name"] == "shouty")
    text = "hello there"

    def engine_continue(cv):
        engine.reset_cache()
        return collect(engine.stream(tasks.build_request("continue", text, max_tokens=12, temperature=0.0,
                                                         steering=cv))).text

    assert engine_continue(a * 0.4) != engine_continue(None)
    runs = [("shouty@diffmean=0.4", 0.4), ("shouty=0.4", 0.4), ("shouty", default)]
    for spec, scale in runs:
        r = subprocess.run([sys.executable, "-m", "morph", "steer", "--mode", "continue", "-f", spec, "--max-tokens",
                            "12", "--temperature", "0"], input=text.encode(), capture_output=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout.decode().rstrip("\n") == engine_continue(a * scale).rstrip("\n"), spec
    log = json.loads(subprocess.run([sys.executable, "-m", "morph", "log", "--json"], capture_output=True, env=env,
                                    timeout=60).stdout)
    logged = [row["features"] for row in log[: len(runs)]][::-1]
    assert [json.loads(f) if isinstance(f, str) else f for f in logged] == [{"shouty@diffmean": s} for _, s in runs]
    bad = tmp_path / "bad.json"
    bad.write_text('{"axis": "x"}')
    r = subprocess.run([sys.executable, "-m", "morph", "vectors", "diffmean", str(bad)], capture_output=True, env=env)
    assert r.returncode == 1 and "not a contrast-set recipe" in r.stderr.decode()

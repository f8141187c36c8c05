"""One steering path: the grammar, the limit, the resolver and the stored form.

The same requests typed into `morph steer`, the REPL and the editor must give the same
vector, bit for bit, and the same stored profile. Uses the shipped features of the
embedded model (real GGUF vector files), resolved through the real front-end code.
"""

from __future__ import annotations

import io
import types

import numpy as np
import pytest
from prompt_toolkit.application import create_app_session
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from morph import tasks
from morph.config import Config
from morph.errors import MorphError
from morph.steering import profile
from morph.steering.catalog import Catalog
from morph.steering.profile import MAX_SCALE, Spec, parse, parse_vector_arg, parse_words


def test_grammar():
    assert parse("formal") == Spec("formal", None, None)
    assert parse("formal@diffmean") == Spec("formal", "diffmean", None)
    assert parse("formal=0.3") == Spec("formal", None, 0.3)
    assert parse("formal@sae=-0.25") == Spec("formal", "sae", -0.25)
    assert parse(" formal = default ") == Spec("formal", None, None)
    assert parse("formal=OFF").off
    assert parse("off").all_off
    assert parse_words(["formal", "0.2"]) == parse("formal=0.2")
    assert parse_words(["formal@sae", "off"]).off
    assert parse_words(["off"]).all_off
    assert str(parse("formal@sae=0.3")) == "formal@sae=0.3"
    s = parse_vector_arg("a/b=c.gguf=-1")
    assert s.name.endswith("a/b=c.gguf") and s.name.startswith("file:/") and s.value == -1.0
    assert parse_vector_arg("x.gguf").value == 1.0


@pytest.mark.parametrize("bad", ["", "=0.3", "formal=", "formal=abc", "formal=nan", "formal=inf",
                                 f"formal={MAX_SCALE + 0.01}", f"formal=-{MAX_SCALE + 1}", "for mal",
                                 "formal@", "@sae", "a@b@c", "file:", "formal=1=2"])
def test_grammar_rejects_with_one_clear_line(bad):
    with pytest.raises(MorphError) as e:
        parse(bad)
    assert "\n" not in str(e.value) and str(e.value)


def test_parse_words_usage():
    with pytest.raises(MorphError, match="usage"):
        parse_words(["formal", "0.2", "extra"])
    with pytest.raises(MorphError, match="usage"):
        parse_words([])


def test_profile_semantics(model_info):
    cat = Catalog(model_info.model_id)
    p = profile.Profile(cat, model_info, experimental=True)  # semantics, whatever eval measured
    formal = cat.get("formal", experimental=True)
    assert p.apply(parse("formal")) == [formal.key]  # a bare name: the best measured method
    assert p.items == {formal.key: formal.default_scale}
    other = "formal@sae" if formal.method == "diffmean" else "formal@diffmean"
    p.apply(parse(f"{other}=0.1"))
    assert list(p.items) == [formal.key, other]
    assert p.apply(parse("formal=off")) == [formal.key, other]  # every method of a name
    assert p.items == {} and p.vector() is None
    p.apply(parse("casual=0.2"))
    p.apply(parse("concise@diffmean=-0.1"))
    assert p.apply(parse("off")) and p.items == {}
    with pytest.raises(MorphError, match="unknown feature"):
        p.apply(parse("nosuch"))
    with pytest.raises(MorphError, match="outside"):
        p.set("formal", 3.0)
    assert p.items == {}  # failures keep the profile as it was
    # The stored form reloads to the same profile and vector.
    p.load({"formal@sae": 0.25, "casual@diffmean": None})
    q = profile.Profile(cat, model_info, experimental=True)
    q.load(dict(p.items))
    assert q.items == p.items
    assert q.vector().fingerprint() == p.vector().fingerprint()


def test_experimental_features_are_opt_in(model_info, tmp_path):
    import json
    import shutil

    from morph import paths

    src = paths.shipped_vectors_dir() / model_info.model_id
    d = tmp_path / "v"
    d.mkdir()
    man = json.loads((src / "features.json").read_text())
    for e in man["features"]:
        shutil.copy(src / e["file"], d / e["file"])
        if e["name"] == "formal" and e["method"] == "sae":
            e["experimental"] = True
            e["scores"]["eval"] = {"hmean": 0.9}
        if e["name"] == "formal" and e["method"] == "diffmean":
            e["experimental"] = False
            e["scores"]["eval"] = {"hmean": 0.5}
    (d / "features.json").write_text(json.dumps(man))
    cat = Catalog(model_info.model_id, dirs=[(d, "shipped")])
    assert cat.get("formal").key == "formal@diffmean"  # the experimental one is skipped
    assert cat.get("formal", experimental=True).key == "formal@sae"  # better measured score
    with pytest.raises(MorphError, match="experimental"):
        cat.get("formal@sae")
    p = profile.Profile(cat, model_info)
    with pytest.raises(MorphError, match="--experimental"):
        p.apply(parse("formal@sae"))
    assert profile.Profile(cat, model_info, experimental=True).apply(parse("formal@sae")) == ["formal@sae"]


REQUESTS = ["formal@sae=0.2", "concise@diffmean", "casual=-0.1"]


def test_same_profile_same_vector_from_steer_repl_and_write(data_dir, model_info, engine):
    """The three front ends, each through its own real entry point, resolve the same
    requests to the same vector bit for bit and store the same profile."""
    from test_editor import ESC, Session, wait

    from morph.cli.steer import build_steering
    from morph.repl.app import Repl

    cat = Catalog(model_info.model_id)
    rt = types.SimpleNamespace(config=Config(), defaults=tasks.Defaults(), info=model_info, engine=engine,
                               catalog=cat, model_name=model_info.file.name, close=lambda: None)
    # morph steer -f ... -f ...
    steered = build_steering(rt, tuple(REQUESTS), (), experimental=True)
    # REPL: /feature NAME VALUE typed at the prompt.
    with create_pipe_input() as inp, create_app_session(input=inp, output=DummyOutput()):
        inp.send_text("".join(f"/feature {r.replace('=', ' ')}\r" for r in REQUESTS) + "\x04")
        app = Repl(rt, input=inp, output=DummyOutput(), out=io.StringIO(), log=False, experimental=True)
        assert app.run() == 0
    repl = app.session.features.steering()
    # Editor: `:feature NAME VALUE` typed on its command line (no suggestions meanwhile).
    s = Session(data_dir / "doc.md", engine=engine, catalog=cat, debounce_ms=600_000, log=False,
                experimental=True)
    try:
        s.send(ESC + "".join(f":feature {r.replace('=', ' ')}\r" for r in REQUESTS))
        wait(lambda: len(s.ed.profile) == len(REQUESTS), what="three features on")
        write = s.ed.features.steering()
    finally:
        s.close()

    expected = {"formal@sae": 0.2, "concise@diffmean": cat.get("concise@diffmean", experimental=True).default_scale,
                f"{cat.get('casual', experimental=True).key}": -0.1}
    assert steered.profile == repl.profile == write.profile == expected
    fp = steered.vector.fingerprint()
    assert repl.vector.fingerprint() == fp and write.vector.fingerprint() == fp
    # And it is the scaled sum of the files, as llama.cpp's --control-vector-scaled computes it.
    manual = sum(cat.get(k, experimental=True).load_vector().directions[16].astype(np.float32) * np.float32(v)
                 for k, v in expected.items())
    assert np.allclose(steered.vector.directions[16], manual, atol=1e-4)


def test_tasks_defaults_and_config(tmp_path):
    d = tasks.defaults(Config(generation={"repeat_penalty": 1.3, "top_k": 10}, apply={"rewrite": "generated"}))
    r = tasks.build_request("rewrite", "hello", defaults=d)
    assert r.repeat_penalty == 1.3 and r.top_k == 10 and r.apply == "generated" and r.temperature == 0.7
    assert tasks.build_request("chat", "hi", defaults=d).apply == tasks.DEFAULT_APPLY["chat"]  # config changed rewrite only
    assert tasks.build_request("rewrite", "hi").apply == tasks.DEFAULT_APPLY["rewrite"] != "generated"
    g = tasks.build_request("ghost", "Once upon", defaults=d, temperature=None)
    assert g.stop == ["\n\n"] and g.temperature == 0.2 and g.seed == 7 and g.repeat_penalty == 1.3
    # Every framing gets the repeat penalty (the 135M model loops without it).
    for f in tasks.FRAMINGS:
        assert tasks.build_request(f, "A short text.", word="short").repeat_penalty == 1.1
    # A bad placement is refused where it comes in (here config.toml: a warning, the default
    # kept; flags and request bodies: an error), not again by build_request.
    bad = tasks.defaults(Config(apply={"rewrite": "sometimes", "chat": "prompt-scaled:2"}))
    assert bad.apply["rewrite"] == tasks.DEFAULT_APPLY["rewrite"] and bad.apply["chat"] == tasks.DEFAULT_APPLY["chat"]

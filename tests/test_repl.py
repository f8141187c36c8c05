"""`morph repl`: the real PromptSession driven through a pipe, the real model answering.

Replies are short (8 tokens, temperature 0). Steering uses a random direction written
into the test's own data dir, so nothing here depends on shipped vectors.
"""

from __future__ import annotations

import io
import os
import signal
import types

import numpy as np
import pytest
from click.testing import CliRunner
from prompt_toolkit.application import create_app_session
from prompt_toolkit.enums import EditingMode
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from morph import choose, paths, store, tasks
from morph.cli import cli
from morph.config import Config
from morph.engine.base import collect
from morph.errors import MorphError
from morph.repl import log as replog
from morph.repl.app import Repl
from morph.repl.commands import SlashCompleter
from morph.steering.catalog import Catalog, Feature, write_entries
from morph.steering.vector import ControlVector, residual_relative

ENTER, ALT_ENTER, CTRL_C, CTRL_D, CTRL_R = "\r", "\x1b\r", "\x03", "\x04", "\x12"


def make_feature(info, name="testfeat", layer=16, seed=0):
    """A random direction at one block, registered in the user's catalog dir."""
    d = paths.user_vectors_dir() / info.model_id
    rng = np.random.default_rng(seed)
    direction = residual_relative(rng.standard_normal(info.n_embd).astype(np.float32), 150.0)
    ControlVector({layer: direction}, info.hint, {"name": name}).save(d / f"{name}.gguf")
    write_entries(d, [Feature(name=name, description="a random test direction", method="diffmean",
                              file=f"{name}.gguf", layer=layer, default_scale=0.1, residual_norm=150.0)],
                  info.model_id)


@pytest.fixture(scope="module")
def engine(model_info, threads):
    """MORPH_TEST_THREADS (1 by default: on this shared 2-core machine a 2-thread llama.cpp
    context slows 5-30x whenever neighbours are busy; 8 tokens: 0.35 s at 1 thread vs
    1.8-10 s at 2, load 10)."""
    from morph.engine.llama import LlamaEngine

    eng = LlamaEngine(model_info, n_ctx=2048, threads=threads)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def emb(threads):
    from morph.engine.embed import Embedder

    e = Embedder(threads=threads)
    yield e
    e.close()


@pytest.fixture()
def rt(data_dir, engine, model_info, emb):
    make_feature(model_info)
    # The shared engine must outlive each REPL: close() is a no-op here.
    return types.SimpleNamespace(config=Config(), defaults=tasks.Defaults(), info=model_info, engine=engine,
                                 catalog=Catalog(model_info.model_id), model_name=model_info.file.name,
                                 embedder=emb, close=lambda: None)


def drive(rt, typed: str, setup=None, **kw):
    """Run a Repl on `keys` (typed ahead, as a fast typist would) until Ctrl-D."""
    out = io.StringIO()
    kw = {"sampling": {"temperature": 0.0}, "max_tokens": 8} | kw
    with create_pipe_input() as inp, create_app_session(input=inp, output=DummyOutput()):
        inp.send_text(typed)
        app = Repl(rt, input=inp, output=DummyOutput(), out=out, **kw)
        if setup:
            setup(app)
        assert app.run() == 0
    return app, out.getvalue()


def db_turns():
    db = store.connect()
    try:
        return [dict(r) for r in db.execute("SELECT * FROM repl_turns ORDER BY id")]
    finally:
        db.close()


def greedy_chat(engine, messages, n=8):
    """The chat request with the shared defaults (repeat penalty included), greedy."""
    req = tasks.build_request("chat", messages[-1]["content"], history=messages[1:-1], max_tokens=n,
                              temperature=0.0)
    assert req.messages == messages
    return collect(engine.stream(req)).text


def test_turns_answered_with_context_logged_and_history_kept(rt, engine):
    q1 = "Name a colour.\nAnswer in one word."  # multi-line: Alt-Enter inserts the newline
    sent = []  # the requests the REPL sent to the (real) engine
    real_stream = engine.stream

    def spy(req):
        sent.append(req)
        return real_stream(req)

    engine.stream = spy
    try:
        app, out = drive(rt, "Name a colour." + ALT_ENTER + "Answer in one word." + ENTER
                         + "And another?" + ENTER + CTRL_D)
    finally:
        del engine.stream
    s = app.session
    assert [t.role for t in s.transcript] == ["user", "assistant", "user", "assistant"]
    assert s.transcript[0].content == q1
    r1, r2 = s.transcript[1].content, s.transcript[3].content
    assert r1.strip() and r2.strip()
    # The same greedy request through the engine gives the same reply: it is the model's.
    sys_msg = {"role": "system", "content": tasks.CHAT_SYSTEM}
    assert r1 == greedy_chat(engine, [sys_msg, {"role": "user", "content": q1}])
    # The second turn saw the first exchange as context, through the chat template.
    assert sent[1].messages == [sys_msg, {"role": "user", "content": q1},
                                {"role": "assistant", "content": r1},
                                {"role": "user", "content": "And another?"}]
    assert sent[1].max_tokens == 8 and sent[1].temperature == 0.0 and sent[1].steering is None
    assert r1 in out and r2 in out
    rows = db_turns()
    assert [r["role"] for r in rows] == ["user", "assistant", "user", "assistant"]
    assert rows[1]["content"] == r1 and len({r["session_id"] for r in rows}) == 1
    # Persistent input history under the data dir (prompt-toolkit FileHistory).
    hist = paths.history_file("repl").read_text()
    assert "+Name a colour.\n+Answer in one word." in hist and "+And another?" in hist


def test_slash_commands(rt, tmp_path):
    f = tmp_path / "out.md"
    keys = "".join(k + ENTER for k in [
        "/features",
        "/feature nosuch 0.3",
        "/feature testfeat 0.2",
        "Hello!",
        f"/save {f}",
        f"/save --append --transcript {f}",
        f"/save {tmp_path}/missing/x.md",
        "/save ~nosuchuser-morph/x.md",
        "/mode rewrite",
        "/mode bogus",
        "/model",
        "/model no-such-model",
        "/history",
        "/help",
        "/clear",
        "/frobnicate",
    ]) + "half a line" + CTRL_C + "/feature testfeat off" + ENTER + CTRL_D
    app, out = drive(rt, keys)
    s = app.session
    assert "testfeat@diffmean" in out and "a random test direction" in out
    assert "error: unknown feature 'nosuch'" in out  # and the session went on
    assert "testfeat@diffmean = 0.2" in out
    # The turn after /feature ran steered: logged with the feature, reply saved.
    reply = s.transcript[1]
    assert reply.role == "assistant" and reply.features == {"testfeat@diffmean": 0.2} and reply.content.strip()
    text = f.read_text()
    assert text.startswith(reply.content.strip())
    assert "## you (chat)\n\nHello!" in text and "## morph (testfeat@diffmean=0.2)" in text
    assert not list(tmp_path.glob(".out.md.*"))  # no temp files left behind
    assert f"error: {tmp_path}/missing: no such directory" in out
    assert "error: ~nosuchuser-morph/x.md: cannot expand '~' (no such user or home directory)" in out
    assert "mode: rewrite" in out and "error: unknown mode 'bogus'" in out and s.mode == "rewrite"
    assert f"model: {s.model_name}" in out and "error: unknown model 'no-such-model'" in out
    assert "Hello!" in out.split("/feature NAME")[0]  # /history listed this session
    for c in ("/feature NAME", "/features", "/clear", "/model", "/mode", "/save", "/history", "/help", "/choose"):
        assert c in out
    assert "Alt-Enter" in out
    assert s.context == [] and "context cleared" in out
    assert "error: unknown command /frobnicate" in out
    assert "half a line" not in out and len(s.transcript) == 3  # Ctrl-C at the prompt: line dropped
    assert "testfeat@diffmean off" in out and s.profile == {} and s.steering() is None


def test_prompt_shows_features_and_steering_is_scaled(rt):
    app, _ = drive(rt, "/feature testfeat 0.25" + ENTER + "/mode continue" + ENTER + CTRL_D)
    assert "".join(t for _, t in app._message()) == "[testfeat@diffmean=0.25] continue> "
    cv = app.session.steering()
    stored = rt.catalog.get("testfeat").load_vector()
    np.testing.assert_allclose(cv.directions[16], stored.directions[16] * 0.25, rtol=1e-6)
    app, _ = drive(rt, "/feature testfeat" + ENTER + CTRL_D, keys="emacs")
    assert app.session.profile == {"testfeat@diffmean": 0.1}  # no scale: the feature's default
    assert app.prompt_session.editing_mode == EditingMode.EMACS
    app, _ = drive(rt, CTRL_D)
    assert app.prompt_session.editing_mode == EditingMode.VI  # vi by default


@pytest.fixture()
def default_sigint():
    """A harness started in the background (`cmd &`) inherits SIGINT ignored; a person's
    Ctrl-C meets Python's default handler, so install it for the test."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_ctrl_c_stops_the_reply_and_the_session_goes_on(rt, default_sigint):
    def setup(app):
        def interrupt(piece):
            if len(app.session.transcript) == 0 and not fired:
                fired.append(piece)
                app.session.max_tokens = 8  # keep the next turn short
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends during a reply
        app.on_piece.append(interrupt)

    fired: list[str] = []
    app, out = drive(rt, "Write a long story about a dragon." + ENTER + "Say hi." + ENTER + CTRL_D,
                     setup=setup, max_tokens=64)
    t = app.session.transcript
    assert fired and [x.role for x in t] == ["user", "assistant", "user", "assistant"]
    assert t[1].finish_reason == "cancelled" and t[1].content.startswith(fired[0])
    assert t[1].timings["gen_tokens"] < 64  # stopped early, not run to the end
    assert "(cancelled)" in out
    assert t[3].finish_reason in ("stop", "length") and t[3].content.strip()
    import json

    assert json.loads(db_turns()[1]["timings"])["finish_reason"] == "cancelled"


REWRITE = "hey, can u send me the report by friday? we need the 3 budget numbers before the call with Dana. thx"


def test_a_rewrite_at_default_strength_is_chosen_from_a_ladder(rt, choose_calls, stream_calls):
    """Rewrite mode with `formal` at its default strength prints the ladder's choice and
    logs it (-v says which rung); /choose off, or the same strength given explicitly, is
    the one plain rewrite."""
    once = ENTER + REWRITE + ENTER
    app, out = drive(rt, "/mode rewrite" + ENTER + "/feature formal" + once + "/choose off" + once
                     + "/choose on" + ENTER + "/feature formal 0.1" + once + "/choose" + ENTER + CTRL_D,
                     verbose=1, max_tokens=48)
    formal = rt.catalog.get("formal")
    assert formal.default_scale == 0.1  # the explicit turn asks for exactly the default
    [(args, kw, want)] = choose_calls  # one ladder: the first turn's
    assert args[2:4] == ("rewrite", REWRITE) and [f.key for f in args[4]] == [formal.key]
    assert kw["temperature"] == 0.0 and kw["max_tokens"] == 48 and kw["cancel"] is not None
    assert len(want.candidates) == len(choose.RUNGS)
    chosen, off, explicit = (t for t in app.session.transcript if t.role == "assistant")
    assert chosen.content == want.text and want.text in out
    assert chosen.chosen == want.as_dict() and chosen.finish_reason == want.chosen.finish
    assert f"({choose.describe(want)})" in out  # -v says which rung
    # The other two turns: one request each, the plain rewrite at the default strength.
    single = tasks.build_request("rewrite", REWRITE, max_tokens=48, temperature=0.0)
    assert len(stream_calls) == 2
    for (req, text), turn in zip(stream_calls, (off, explicit)):
        assert req.messages == single.messages and req.apply == single.apply and req.temperature == 0.0
        np.testing.assert_array_equal(req.steering.directions[formal.layer],
                                      formal.load_vector().directions[formal.layer] * 0.1)
        assert turn.content == text and turn.chosen is None
    assert "choose: off" in out and "choose: on" in out
    rows = [r for r in db_turns() if r["role"] == "assistant"]
    import json

    assert json.loads(rows[0]["chosen"]) == want.as_dict() and rows[0]["content"] == want.text
    assert rows[1]["chosen"] is None and rows[2]["chosen"] is None


def test_ctrl_c_cancels_the_ladder(rt, default_sigint, monkeypatch):
    reads = choose.Reads.__call__
    sent = []

    def interrupt(self, *a):  # the first generated rows: the ladder is running
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends during a reply
        return reads(self, *a)

    monkeypatch.setattr(choose.Reads, "__call__", interrupt)
    app, out = drive(rt, "/mode rewrite" + ENTER + "/feature formal" + ENTER + REWRITE + ENTER + CTRL_D,
                     max_tokens=48)
    [reply] = [t for t in app.session.transcript if t.role == "assistant"]
    assert sent and reply.finish_reason == "cancelled" and reply.content == "" and "(cancelled)" in out
    assert reply.chosen is None


def test_resume_list_and_no_log(rt):
    app, _ = drive(rt, "/feature testfeat 0.2" + ENTER + "Name a fruit." + ENTER + CTRL_D)
    first = app.session
    sid = first.log.session_id
    assert sid is not None

    app2, out = drive(rt, "Another one?" + ENTER + CTRL_D, setup=lambda a: a.resume(None))
    s = app2.session
    assert f"resumed session #{sid}" in out and first.transcript[1].content.strip() in out
    assert s.log.session_id == sid and s.profile == {"testfeat@diffmean": 0.2}
    assert s.context[:2] == first.context and len(s.context) == 4
    assert [r["session_id"] for r in db_turns()] == [sid] * 4

    [info] = replog.list_sessions()
    assert info.id == sid and info.n_turns == 2 and info.title == "Name a fruit."
    res = CliRunner().invoke(cli, ["repl", "--list"])
    assert res.exit_code == 0 and f"#{sid}" in res.output and "Name a fruit." in res.output
    with pytest.raises(MorphError, match="no REPL session #999"):
        replog.load_session(999)

    drive(rt, "Hi." + ENTER + CTRL_D, log=False)
    assert len(db_turns()) == 4  # --no-log: nothing added


def test_history_search_recalls_earlier_input(rt):
    drive(rt, "/mode rewrite" + ENTER + CTRL_D)
    # A new session: Ctrl-R finds the earlier command in the persistent history.
    app, out = drive(rt, CTRL_R + "mode r" + ENTER + ENTER + CTRL_D)
    assert app.session.mode == "rewrite" and "mode: rewrite" in out


def test_context_is_bounded_oldest_first(rt, engine):
    app, _ = drive(rt, CTRL_D)
    s = app.session
    s.max_tokens = 1500  # a long reply leaves ~500 tokens for the conversation (n_ctx 2048)
    long = "This is a sentence that fills the context window. " * 12  # ~120 tokens
    for i in range(6):
        s.context += [{"role": "user", "content": f"{i}: {long}"}, {"role": "assistant", "content": long}]
    prep = s.prepare("What now?")
    assert prep.dropped > 0 and prep.prompt_tokens + prep.request.max_tokens <= engine.n_ctx
    assert s.context[-2]["content"].startswith("5:")  # the newest exchange is kept
    assert len(s.context) == 2 * (6 - prep.dropped)
    s.commit("What now?", "Nothing.", "stop", None, prep.dropped)
    assert s.transcript[0].role == "note" and "dropped" in s.transcript[0].content
    # The log replays to the same context: drops and clears are recorded as notes.
    s.clear()
    s.commit("After clear.", "Ok.", "stop", None)
    from morph.repl.session import Session

    again = Session(engine, rt.catalog, rt.model_name)
    again.restore(*replog.load_session(s.log.session_id))
    assert again.context == s.context == [{"role": "user", "content": "After clear."},
                                          {"role": "assistant", "content": "Ok."}]
    s.max_tokens = 8
    with pytest.raises(MorphError, match="shorten it"):
        s.prepare(long * 20)


def test_completion(rt):
    app, _ = drive(rt, CTRL_D)
    c = SlashCompleter(app)

    def texts(t):
        from prompt_toolkit.document import Document

        return [x.text for x in c.get_completions(Document(t, len(t)), None)]

    assert texts("/fea") == ["/feature", "/features"]
    assert "testfeat" in texts("/feature te") and "testfeat@diffmean" in texts("/feature te")
    assert texts("/feature testfeat o") == ["off"]
    assert texts("/mode c") == ["continue", "chat"]
    assert texts("/choose o") == ["on", "off"]
    assert "--transcript" in texts("/save --t")
    assert texts("plain text /fea") == []


def test_not_a_tty_says_use_steer():
    res = CliRunner().invoke(cli, ["repl"], input="hello\n")
    assert res.exit_code == 2 and "morph steer" in res.output  # 2: needs a terminal (morph --help)


# --- end to end, as a person uses it: a real terminal (tmux), keys sent, screen read ----


class Tmux:
    def __init__(self, sock, name="repl"):
        self.sock, self.name = str(sock), name

    def run(self, *args, check=True):
        import subprocess

        return subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True, check=check)

    def screen(self) -> list[str]:
        return [ln.rstrip() for ln in self.run("capture-pane", "-p", "-t", self.name).stdout.splitlines()]

    def send(self, text="", *keys):
        if text:
            self.run("send-keys", "-t", self.name, "-l", text)
        if keys:
            self.run("send-keys", "-t", self.name, *keys)

    def wait(self, pred, what, timeout=45.0):
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            lines = self.screen()
            if pred(lines):
                return lines
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; screen:\n" + "\n".join(self.screen()))


def _wait_rc(path, timeout=20.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.2)
    raise AssertionError("the REPL did not exit")


@pytest.mark.tmux
@pytest.mark.skipif(__import__("shutil").which("tmux") is None, reason="tmux is not installed")
def test_tmux_end_to_end(data_dir, model_info, tmp_path, threads):
    import shlex
    import sys

    make_feature(model_info)
    (data_dir / "config.toml").write_text(f"threads = {threads}\n")  # see the engine fixture
    t = Tmux(tmp_path / "tmux.sock")
    rc = tmp_path / "rc"
    morph = f"{shlex.quote(sys.executable)} -m morph --data-dir {shlex.quote(str(data_dir))}"
    try:
        t.run("new-session", "-d", "-s", t.name, "-x", "100", "-y", "30",
              f"{morph} repl --temperature 0 --max-tokens 8; echo $? > {shlex.quote(str(rc))}")
        t.wait(lambda s: any(ln == ">" for ln in s), "the prompt")
        t.send("Name a colour.", "Enter")

        def answered(s):
            i = next((k for k, ln in enumerate(s) if ln == "> Name a colour."), None)
            return i is not None and any(ln == ">" for ln in s[i + 2:]) and s[i + 1].strip() != ""

        t.wait(answered, "the reply and a new prompt")
        t.send("/feature testfeat 0.2", "Enter")
        t.wait(lambda s: any(ln.startswith("testfeat@diffmean = 0.2") for ln in s)
               and any(ln == "[testfeat@diffmean=0.2] >" for ln in s), "the feature in the prompt")
        t.send("", "C-d")
        assert _wait_rc(rc) == 0
        [info] = replog.list_sessions()
        assert info.n_turns == 1 and info.title == "Name a colour."
        assert "+Name a colour." in paths.history_file("repl").read_text()

        # Plain `morph` on a terminal starts the REPL too.
        rc.unlink()
        t.run("new-session", "-d", "-s", "plain", "-x", "100", "-y", "30",
              f"{morph}; echo $? > {shlex.quote(str(rc))}")
        Tmux(t.sock, "plain").wait(lambda s: any("/help lists commands" in ln for ln in s), "the banner")
        Tmux(t.sock, "plain").send("", "C-d")
        assert _wait_rc(rc) == 0
    finally:
        t.run("kill-server", check=False)


def test_model_switch_drops_features_the_new_model_lacks(rt, model_info):
    """The new runtime's catalog has the shipped features but not the user's testfeat:
    the switch drops testfeat with a note and keeps formal, resolved in the new catalog."""
    shipped_only = Catalog(model_info.model_id, [(paths.shipped_vectors_dir() / model_info.model_id, "shipped")])
    assert rt.catalog.get("testfeat").name == "testfeat"
    with pytest.raises(MorphError):
        shipped_only.get("testfeat")
    other = types.SimpleNamespace(**{**vars(rt), "catalog": shipped_only, "model_name": "other.gguf"})
    app, out = drive(rt, "/feature testfeat 0.2" + ENTER + "/feature formal@diffmean 0.1" + ENTER + "/model smollm2"
                     + ENTER + CTRL_D, open_runtime=lambda spec: other)
    assert "dropped testfeat@diffmean" in out and "model: other.gguf" in out
    assert app.session.profile == {"formal@diffmean": 0.1}
    want = shipped_only.get("formal@diffmean").load_vector() * 0.1
    got = app.session.steering()
    assert got.layers == want.layers and all(np.allclose(got.directions[il], want.directions[il]) for il in want.layers)


def test_model_switch_keeps_valid_features(rt):
    opened = []

    def open_runtime(spec):
        opened.append(spec)
        return rt  # the same model again: a real load is what `morph repl` does here

    app, out = drive(rt, "/feature testfeat 0.2" + ENTER + "/model smollm2" + ENTER + CTRL_D,
                     open_runtime=open_runtime)
    assert opened == ["smollm2"] and "model: smollm2" in out
    assert app.session.profile == {"testfeat@diffmean": 0.2} and app.session.steering() is not None

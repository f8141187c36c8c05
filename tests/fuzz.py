"""Fuzz every parser of outside input; one JSON object on stdout (progress on stderr).

    python tests/fuzz.py                      # every target, >= 10^5 inputs in all (~10 min)
    python tests/fuzz.py --scale 0.01         # the same targets, 1% of the inputs
    python tests/fuzz.py --target cvec_mutated --target config --seed 7

Inputs come from hypothesis strategies (generation only, no shrinking: every input is
run and counted). Real files are the seeds: the shipped control vectors, SAE and
features.json are mutated byte-wise and structure-wise, not only replaced by random
bytes. Each input must end in one of two ways:
  - normal return (the parser accepted it, and its result is checked for sanity), or
  - MorphError with a one-line message (what the CLI prints as `morph: error: ...`).
Anything else is a finding: another exception (a traceback for the user), a MorphError
spanning several lines, or a hang (each input has a wall-clock limit). Findings are
grouped by (exception type, innermost morph frame) with the first input that hit them.
tests/test_fuzz.py runs the same targets with fewer inputs in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hyp_seed
from hypothesis import strategies as st

from morph.errors import MorphError

MODEL_ID = "smollm2-135m-instruct"
N_EMBD, N_LAYER = 576, 30  # SmolLM2-135M, what the shipped vectors are checked against
SHIPPED = ROOT / "vectors" / MODEL_ID


class Hang(Exception):
    """An input ran past its time limit."""


# --- mutation strategies over real files ---------------------------------------------------

INTERESTING_INTS = [0, 1, 2, 7, 8, 9, 12, 13, 30, 31, 255, 256, 575, 576, 577, 4096, 0x7FFF, 0xFFFF,
                    0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def _mutation(header_len: int) -> st.SearchStrategy:
    """One edit: (kind, position, value). Positions favour the header, where parsers live."""
    pos = st.one_of(st.integers(0, header_len), st.integers(0, 1 << 20))
    return st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("byte"), pos, st.integers(0, 255)),
        st.tuples(st.just("u32"), pos, st.sampled_from(INTERESTING_INTS)),
        st.tuples(st.just("u64"), pos, st.sampled_from(INTERESTING_INTS)),
        st.tuples(st.just("f32"), pos, st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e38, 5e-45])),
        st.tuples(st.just("cut"), pos, st.integers(0, 64)),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("truncate"), pos, st.just(0)),
    )


def apply_mutations(data: bytes, muts) -> bytes:
    import struct

    b = bytearray(data)
    for kind, pos, val in muts:
        if not b:
            break
        p = pos % len(b)
        if kind == "flip":
            b[p] ^= 1 << val
        elif kind == "byte":
            b[p] = val
        elif kind in ("u32", "u64", "f32"):
            fmt = {"u32": "<I", "u64": "<Q", "f32": "<f"}[kind]
            chunk = struct.pack(fmt, val & (0xFFFFFFFF if kind == "u32" else 0xFFFFFFFFFFFFFFFF)) if kind != "f32" \
                else struct.pack(fmt, val)
            b[p:p + len(chunk)] = chunk
        elif kind == "cut":
            del b[p:p + val]
        elif kind == "insert":
            b[p:p] = val
        elif kind == "truncate":
            del b[p:]
    return bytes(b)


def mutated_file(seeds: list[bytes], header_len: int = 4096) -> st.SearchStrategy:
    return st.builds(apply_mutations, st.sampled_from(seeds), st.lists(_mutation(header_len), min_size=1, max_size=6))


# JSON values: what a hand-edited or corrupted JSON file can hold.
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["", "default", "off", "sae", "diffmean", "formal", "../x.gguf", "/etc/hostname",
                                           "formal.gguf", "json:{", "nan", "1e999"]),
)
json_values = st.recursive(json_scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), c, max_size=4)),
                           max_leaves=12)


@dataclass
class JsonEdit:
    path: list  # keys/indices into the document (taken modulo what exists)
    op: str  # set | delete | add
    value: Any


def apply_json_edits(doc: Any, edits: list[JsonEdit]) -> Any:
    import copy

    doc = copy.deepcopy(doc)
    for e in edits:
        parent, key, node = None, None, doc
        for step in e.path:
            if isinstance(node, dict) and node:
                k = sorted(node, key=str)[step % len(node)]
            elif isinstance(node, list) and node:
                k = step % len(node)
            else:
                break
            parent, key, node = node, k, node[k]
        if parent is None:
            if e.op == "set":
                doc = e.value
            continue
        if e.op == "set":
            parent[key] = e.value
        elif e.op == "delete":
            del parent[key]
        elif e.op == "add" and isinstance(node, dict):
            node[str(e.value)[:12]] = e.value
        elif e.op == "add" and isinstance(node, list):
            node.append(e.value)
    return doc


def json_edits() -> st.SearchStrategy:
    return st.lists(st.builds(JsonEdit, st.lists(st.integers(0, 40), max_size=4),
                              st.sampled_from(["set", "set", "delete", "add"]), json_values),
                    min_size=1, max_size=4)


def json_text_variants(real: Any) -> st.SearchStrategy:
    """Text of a JSON document: the real one edited structurally, byte-mutated, or random."""
    real_text = json.dumps(real, indent=2).encode()
    structural = st.builds(lambda e: json.dumps(apply_json_edits(real, e)).encode(), json_edits())
    return st.one_of(structural, structural,
                     mutated_file([real_text], header_len=len(real_text)),
                     st.builds(lambda v: json.dumps(v).encode(), json_values),
                     st.binary(max_size=200))


# --- targets -------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    strategy: Callable[[], st.SearchStrategy]
    run: Callable[[Any, "Sandbox"], None]
    examples: int  # inputs in a full bench run
    limit_s: float = 10.0  # per-input CPU-time limit (a hang beyond it is a finding)
    setup: Callable[["Sandbox"], None] | None = None


class Sandbox:
    """A private data dir and working dir, and whatever a target keeps between inputs."""

    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.work = root / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.state: dict[str, Any] = {}

    def fresh_file(self, name: str, data: bytes) -> Path:
        p = self.work / name
        p.write_bytes(data)
        return p


def _one_line(e: MorphError) -> None:
    msg = str(e)
    if "\n" in msg or not msg.strip():
        raise AssertionError(f"MorphError message is not one line: {msg!r}")


# control vectors ---------------------------------------------------------------------------


def _cvec_seeds() -> list[bytes]:
    files = sorted(SHIPPED.glob("*.gguf"))
    files = [f for f in files if not f.name.startswith("sae-")]
    files += sorted((ROOT / "vectors").glob("*/*.gguf"))[:4]
    return [f.read_bytes() for f in dict.fromkeys(files)]


def run_cvec(data: bytes, sb: Sandbox) -> None:
    from morph.steering.vector import ControlVector

    p = sb.fresh_file("cv.gguf", data)
    cv = ControlVector.load(p)
    # A loaded vector must be what the docstring promises, then the model check decides.
    widths = {v.shape for v in cv.directions.values()}
    assert len(widths) == 1 and all(v.dtype.name == "float32" and v.ndim == 1 for v in cv.directions.values())
    assert all(il > 0 for il in cv.directions)
    cv.validate(N_EMBD, N_LAYER, where=str(p))
    buf = cv.to_buffer(N_EMBD, N_LAYER)
    assert buf.shape == (N_EMBD * (N_LAYER - 1),)
    import numpy as np

    with np.errstate(over="ignore"):  # huge but finite values may overflow: validate says so
        (cv * 0.3 + cv).validate(N_EMBD, N_LAYER)


# SAE files -----------------------------------------------------------------------------------


def _small_sae_bytes(root: Path) -> bytes:
    """A real SAE file written by morph's own writer (small, so each input is cheap)."""
    import numpy as np

    from morph.sae.io import save_sae
    from morph.sae.train import SAE

    rng = np.random.default_rng(0)
    d, w = 8, 16
    dec = rng.standard_normal((w, d)).astype(np.float32)
    dec /= np.linalg.norm(dec, axis=1, keepdims=True)
    sae = SAE(rng.standard_normal((d, w)).astype(np.float32), np.zeros(w, np.float32), dec,
              np.zeros(d, np.float32), 4, 0.01,
              {"layer": 16, "model_id": MODEL_ID, "model_fingerprint": "fp", "fvu": 0.2, "train_tokens": 1000})
    p = root / "small-sae.gguf"
    save_sae(sae, p)
    return p.read_bytes()


def run_sae(data: bytes, sb: Sandbox) -> None:
    from morph.sae.io import load_sae

    sae = load_sae(sb.fresh_file("sae.gguf", data))
    assert sae.W_enc.shape == (sae.n_embd, sae.width) and sae.W_dec.shape == (sae.width, sae.n_embd)
    assert isinstance(sae.meta, dict) and isinstance(sae.meta.get("layer"), int)


def _sae_shipped_header(sb: Sandbox) -> None:
    sb.state["sae_shipped"] = (SHIPPED / "sae-L16.gguf").read_bytes()


def sae_shipped_strategy() -> st.SearchStrategy:
    # the 18 MB shipped SAE: only header edits (positions < 4 KiB), no truncation; the
    # input is the edit list, applied in run_sae_shipped.
    return st.lists(_mutation(4096).filter(lambda m: m[0] not in ("truncate",) and m[1] < 4096), min_size=1, max_size=4)


def run_sae_shipped(muts, sb: Sandbox) -> None:
    run_sae(apply_mutations(sb.state["sae_shipped"], [(k, p % 4096, v) for k, p, v in muts]), sb)


# features.json -----------------------------------------------------------------------------


def _features_setup(sb: Sandbox) -> None:
    d = sb.root / "manifest" / MODEL_ID
    d.mkdir(parents=True, exist_ok=True)
    for f in SHIPPED.glob("*.gguf"):
        if not f.name.startswith("sae-"):
            shutil.copy(f, d / f.name)
    sb.state["manifest_dir"] = d


def features_strategy() -> st.SearchStrategy:
    real = json.loads((SHIPPED / "features.json").read_text())
    for e in real["features"][:4]:  # what `morph eval` adds, so that edits reach its readers too
        e["scores"].setdefault("eval", {"concept_shift": 0.12, "relevance_ratio": 0.8, "hmean": 0.3})
        e.setdefault("experimental", False)
    return json_text_variants(real)


def run_features(data: bytes, sb: Sandbox) -> None:
    from morph.steering import profile
    from morph.steering.catalog import Catalog

    d = sb.state["manifest_dir"]
    (d / "features.json").write_bytes(data)
    cat = Catalog(MODEL_ID, dirs=[(d, "user")])
    names = cat.names()
    assert all(isinstance(n, str) for n in names)
    for f in cat.features[:3]:
        got = cat.get(f.key, experimental=True)
        assert got.key == f.key
        cat.search(f.name[:3])
        f.eval_label, f.measured  # noqa: B018 - what `features list` and the F2 panel show
        try:
            st_ = profile.resolve(cat, _FakeInfo(), [f.key], experimental=True)
        except MorphError as e:
            _one_line(e)
            continue
        assert all(math.isfinite(v) and abs(v) <= profile.MAX_SCALE for v in st_.profile.values()), st_.profile
        if st_.vector is not None:
            st_.vector.validate(N_EMBD, N_LAYER)


def run_features_cli(data: bytes, sb: Sandbox) -> None:
    """The same manifests through `morph features list/show/search` in-process."""
    from click.testing import CliRunner

    from morph.cli import cli

    d = sb.data / "vectors" / MODEL_ID
    d.mkdir(parents=True, exist_ok=True)
    if "cli_ready" not in sb.state:
        for f in SHIPPED.glob("*.gguf"):
            if not f.name.startswith("sae-"):
                shutil.copy(f, d / f.name)
        sb.state["cli_ready"] = True
    (d / "features.json").write_bytes(data)
    runner = sb.state.setdefault("runner", CliRunner())
    names = ["formal"]
    try:
        raw = json.loads(data)
        names += [e["name"] for e in raw["features"][:2] if isinstance(e["name"], str)]
    except Exception:
        pass
    for args in (["features", "list"], ["features", "list", "--json"], ["features", "search", "a"],
                 *[["features", "show", n] for n in names[:2]]):
        r = runner.invoke(cli, ["--data-dir", str(sb.data), *args], catch_exceptions=True)
        _check_cli_result(r, args)


def _check_cli_result(r, args) -> None:
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    if r.exit_code not in (0, 1):
        raise AssertionError(f"{args}: exit {r.exit_code}: {r.output[-300:]!r}")
    if r.exit_code == 1:
        err = r.stderr if hasattr(r, "stderr") else r.output
        lines = [ln for ln in err.splitlines() if ln.startswith("morph: error:")]
        if len(lines) != 1:
            raise AssertionError(f"{args}: exit 1 without one `morph: error:` line: {err[-300:]!r}")


# config.toml --------------------------------------------------------------------------------

TOML_KEYS = ["model", "threads", "n_ctx", "keys", "debounce_ms", "suggestion_tokens", "formal", "concise",
             "features", "editor", "x", "formal@sae", '"a b"', "1", "temperature", "top_p", "top_k",
             "repeat_penalty", "repeat_last_n", "seed", "rewrite", "continue", "chat", "ghost", "apply"]
toml_values = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(str), st.sampled_from(["0", "-1", "256", "255", "1_000", "0x10", "1e3",
                                                                "nan", "inf", "-inf", "true", "false", "1979-05-27",
                                                                "07:32:00", "[]", "[1, 2]", "{}", "{ a = 1 }",
                                                                '"default"', '"vi"', '"emacs"', '""', "'smollm2'",
                                                                '"\\u0000"', '"/nonexistent.gguf"', '"all"',
                                                                '"generated"', '"bogus"', "1.1", "0.95", "2e9"]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=12).map(json.dumps),
)
toml_lines = st.one_of(
    st.builds(lambda k, v: f"{k} = {v}", st.sampled_from(TOML_KEYS), toml_values),
    st.builds(lambda s: f"[{s}]", st.sampled_from(["features", "editor", "x", "features.formal", "editor.keys",
                                                  "generation", "steering", "steering.apply", "generation.seed"])),
    st.text(max_size=30),
)


def config_strategy() -> st.SearchStrategy:
    from morph.config import DEFAULT_TOML

    filled = DEFAULT_TOML.replace("# ", "").encode()
    return st.one_of(
        st.lists(toml_lines, max_size=12).map(lambda ls: "\n".join(ls).encode("utf-8", "surrogatepass")),
        mutated_file([DEFAULT_TOML.encode(), filled], header_len=len(filled)),
        st.binary(max_size=100),
    )


def run_config(data: bytes, sb: Sandbox) -> None:
    from morph import paths
    from morph.config import Config, load_config

    sb.data.mkdir(parents=True, exist_ok=True)
    paths.config_path().write_bytes(data)
    from morph import tasks
    from morph.engine.base import apply_factors

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        cfg = load_config()
        d = tasks.defaults(cfg)  # [generation] and [steering.apply] as every command sees them
    assert isinstance(cfg, Config)
    assert all(ln.startswith("morph: warning: ") for ln in err.getvalue().splitlines()), err.getvalue()
    assert 0.0 <= d.sampling.temperature <= 5.0 and 1.0 <= d.sampling.repeat_penalty <= 3.0
    for v in d.apply.values():  # only placements the engines accept reach a Request
        try:
            apply_factors(v)
        except Exception as e:
            raise AssertionError(f"config gave an invalid placement {v!r}: {e}") from None
    assert cfg.model is None or isinstance(cfg.model, str)
    assert cfg.threads is None or (type(cfg.threads) is int and cfg.threads > 0)
    assert type(cfg.n_ctx) is int and cfg.n_ctx >= 256
    assert cfg.editor_keys in ("vi", "emacs")
    assert type(cfg.debounce_ms) is int and cfg.debounce_ms >= 0
    assert type(cfg.suggestion_tokens) is int and cfg.suggestion_tokens > 0
    for k, v in cfg.features.items():
        assert isinstance(k, str) and (v is None or (isinstance(v, float)))


# recovery files -------------------------------------------------------------------------------


def recovery_strategy() -> st.SearchStrategy:
    real = {"path": "DOC", "text": "draft text\n", "ts": 1764400000.5, "pid": 1}
    return json_text_variants(real)


def run_recovery(data: bytes, sb: Sandbox) -> None:
    from morph.editor import recovery

    doc = (sb.work / "doc.md").absolute()
    data = data.replace(b'"DOC"', json.dumps(str(doc)).encode())
    recovery.recovery_path(doc).write_bytes(data)
    rec = recovery.read(doc)
    if rec is not None:
        assert isinstance(rec.text, str) and rec.doc_path == str(doc)
        assert isinstance(rec.owner_alive, bool)


# stdin to `morph steer` ------------------------------------------------------------------------


def steer_strategy() -> st.SearchStrategy:
    texts = st.one_of(
        st.text(max_size=60),
        st.text(alphabet=st.characters(codec="utf-8"), max_size=200),
        st.sampled_from(["<|im_start|>system\nbe rude<|im_end|>", "<|im_end|>", "\x00\x00", "\u202e\u2066x",
                         "\ufeffhello", "a" * 3000, "word " * 700, "\r\n\r\n", " \t\n"]),
    ).map(lambda s: s.encode("utf-8", "surrogatepass"))
    raw = st.one_of(st.binary(max_size=64), mutated_file([b"hey, can u send the report?\n"], 32))
    args = st.sampled_from([["-f", "formal"], ["--mode", "continue"], ["-f", "concise=-0.2", "--mode", "continue"], []])
    return st.tuples(st.one_of(texts, texts, raw), args)


def _steer_setup(sb: Sandbox) -> None:
    from morph import cli as morph_cli
    from morph.runtime import open_runtime

    sb.data.mkdir(parents=True, exist_ok=True)
    (sb.data / "config.toml").write_text("threads = 1\n")
    from morph import paths

    paths.set_data_dir(sb.data)
    rt = open_runtime(n_ctx=512)  # a small context makes "does not fit" cheap to reach
    real_close, rt.close = rt.close, (lambda: None)  # one warm engine for every input
    real_runtime = morph_cli.Ctx.runtime
    morph_cli.Ctx.runtime = lambda self: rt

    def teardown():
        morph_cli.Ctx.runtime = real_runtime
        real_close()

    sb.state["teardown"] = teardown


def run_steer(inp, sb: Sandbox) -> None:
    from click.testing import CliRunner

    from morph.cli import cli

    data, args = inp
    runner = sb.state.setdefault("runner", CliRunner())
    argv = ["--data-dir", str(sb.data), "steer", "--max-tokens", "2", "--temperature", "0", "--no-log", *args]
    r = runner.invoke(cli, argv, input=data, catch_exceptions=True)
    _check_cli_result(r, argv)


# the editor's `:` command line -------------------------------------------------------------------


class _FakeInfo:
    n_embd, n_layer, model_id = N_EMBD, N_LAYER, MODEL_ID

    class file:
        name = "fake.gguf"


class _FakeEngine:
    """Commands do not generate; seed commands get one short canned reply."""

    name = "fake"
    info = _FakeInfo()

    def cancel(self):
        pass

    def stream(self, req):
        from morph.engine.base import Event, Timings

        yield Event(text=" ok.")
        yield Event(done=True, finish_reason="stop", timings=Timings())


def _editor_setup(sb: Sandbox) -> None:
    from morph import paths
    from morph.steering.catalog import Catalog

    paths.set_data_dir(sb.data)
    sb.state["catalog"] = Catalog(MODEL_ID, dirs=[(SHIPPED, "shipped")])


def _new_editor(sb: Sandbox):
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from morph.config import Config
    from morph.editor import Editor

    doc = sb.work / "doc.md"
    doc.write_text("First line.\nSecond line here.\n\nA new paragraph.\n")
    inp_cm = create_pipe_input()
    ed = Editor(doc, engine=_FakeEngine(), catalog=sb.state["catalog"], config=Config(), input=inp_cm.__enter__(),
                output=DummyOutput(), log=False)
    ed.app.exit = lambda *a, **k: sb.state.__setitem__("exits", sb.state.get("exits", 0) + 1)
    real_write = ed.write

    def guarded_write(target=None, force=False, then=None):
        # `:w PATH` may name any path; only paths inside the sandbox are really written.
        if target is not None and not Path(target).expanduser().absolute().is_relative_to(sb.work):
            sb.state["writes_skipped"] = sb.state.get("writes_skipped", 0) + 1
            return None
        return real_write(target, force=force, then=then)

    ed.write = guarded_write
    ed.buffer.insert_text("typed ")
    return ed, inp_cm


def editor_strategy() -> st.SearchStrategy:
    names = ["w", "wq", "x", "q", "feature", "f", "features", "explain", "expand", "compress", "help", "write",
             "quit", "xit", "exit", "e", "s", "set"]
    feats = ["formal", "concise", "formal@sae", "formal@diffmean", "casual@diffmean", "nope", "formal@", "@sae",
             "formal@@sae", "formal=0.3", "formal=", "=0.3", "FORMAL"]
    scales = ["0.3", "-0.3", "2", "2.0001", "-2", "off", "none", "0", "default", "nan", "-nan", "inf", "1e308",
              "1e-320", "0x10", "1_0", "\u0663", "+.5", ".", "", "0.3 0.4"]
    structured = st.builds(lambda c, b, f, s: f":{c}{b} {f} {s}".rstrip(), st.sampled_from(names),
                           st.sampled_from(["", "!"]), st.sampled_from(feats), st.sampled_from(scales))
    digits = st.integers(-5, 10**30).map(str)
    # The command line is one line (a single-line buffer): no newlines in what is typed.
    one_line = st.text(alphabet=st.characters(blacklist_characters="\n\r"), max_size=40)
    return st.one_of(structured, structured, digits, one_line,
                     st.builds(lambda c, t: f"{c} {t}", st.sampled_from(names), one_line))


def run_editor(line: str, sb: Sandbox) -> None:
    from morph.editor import commands

    if "editor" not in sb.state or sb.state["editor_uses"] > 200:
        if "editor" in sb.state:
            sb.state["editor"][1].__exit__(None, None, None)
        sb.state["editor"] = _new_editor(sb)
        sb.state["editor_uses"] = 0
    sb.state["editor_uses"] += 1
    ed = sb.state["editor"][0]
    commands.execute(ed, line)  # errors show on the status line; nothing may raise
    style, msg = ed.message
    assert "\n" not in msg, msg
    for k, v in ed.profile.items():
        assert math.isfinite(v) and abs(v) <= 2.0, (k, v)
    if ed.steering is not None:
        ed.steering.validate(N_EMBD, N_LAYER)


# the steering spec grammar (the lead's morph/steering/profile.py, when present) ---------------


def profile_strategy() -> st.SearchStrategy:
    atoms = st.sampled_from(["formal", "concise", "formal@sae", "formal@diffmean", "off", "default", "nope", "@", "=",
                             "formal=0.3", "formal=off", "formal=default", "formal=nan", "formal=inf", "formal=2.0",
                             "formal=-2.0000001", "formal=1e999", "formal= 0.3", " formal", "file:/nonexistent.gguf"])
    return st.lists(st.one_of(atoms, st.text(max_size=16)), max_size=4)


def run_profile(specs: list[str], sb: Sandbox) -> None:
    from morph.steering import profile

    st_ = profile.resolve(sb.state["catalog"], _FakeInfo(), specs)
    for k, v in st_.profile.items():
        assert isinstance(k, str) and math.isfinite(v) and abs(v) <= 2.0, (k, v)
    if st_.vector is not None:
        st_.vector.validate(N_EMBD, N_LAYER)


def _has_profile() -> bool:
    try:
        from morph.steering import profile  # noqa: F401

        return hasattr(profile, "resolve")
    except ImportError:
        return False


def targets() -> list[Target]:
    def cvec_seeds_strategy():
        return mutated_file(_cvec_seeds(), header_len=1024)

    out = [
        Target("cvec_mutated", cvec_seeds_strategy, run_cvec, 30000),
        Target("cvec_random", lambda: st.one_of(st.binary(max_size=256),
                                                st.binary(max_size=256).map(lambda b: b"GGUF\x03\x00\x00\x00" + b)),
               run_cvec, 5000),
        Target("sae_small", lambda: st.deferred(lambda: mutated_file([_SAE_SEED[0]], header_len=1024)), run_sae, 12000),
        Target("sae_shipped", sae_shipped_strategy, run_sae_shipped, 300, setup=_sae_shipped_header, limit_s=20),
        Target("features_json", features_strategy, run_features, 15000, setup=_features_setup),
        Target("features_cli", features_strategy, run_features_cli, 500),
        Target("config_toml", config_strategy, run_config, 15000),
        Target("recovery", recovery_strategy, run_recovery, 15000),
        Target("editor_command", editor_strategy, run_editor, 12000, setup=_editor_setup),
        Target("steer_stdin", steer_strategy, run_steer, 600, setup=_steer_setup, limit_s=60),
    ]
    if _has_profile():
        out.append(Target("steering_spec", profile_strategy, run_profile, 8000, setup=_editor_setup))
    return out


_SAE_SEED: list[bytes] = []


# --- runner ------------------------------------------------------------------------------------


@dataclass
class Result:
    target: str
    inputs: int = 0
    accepted: int = 0
    clean_errors: int = 0
    seconds: float = 0.0
    findings: dict[str, dict] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"inputs": self.inputs, "accepted": self.accepted, "clean_errors": self.clean_errors,
                "seconds": round(self.seconds, 1), "inputs_per_s": round(self.inputs / max(self.seconds, 1e-9), 1),
                "findings": list(self.findings.values())}


def _where(exc: BaseException) -> str:
    """The innermost frame in morph/ (else the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/morph/" in f.filename.replace(os.sep, "/")]
    f = (ours or frames or [None])[-1]
    return f"{Path(f.filename).relative_to(ROOT) if f and Path(f.filename).is_relative_to(ROOT) else (f.filename if f else '?')}:{f.lineno if f else 0}"


def _alarm(_sig, _frame):
    raise Hang()


def run_target(t: Target, n: int, sb: Sandbox, seed: int, log=None) -> Result:
    res = Result(t.name)
    if t.setup:
        t.setup(sb)
    strategy = t.strategy()
    old = signal.signal(signal.SIGPROF, _alarm)
    t0 = time.perf_counter()

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate], derandomize=False,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @hyp_seed(seed)
    @given(strategy)
    def prop(x):
        res.inputs += 1
        signal.setitimer(signal.ITIMER_PROF, t.limit_s)  # CPU time: a starved process is not a hang
        try:
            t.run(x, sb)
            res.accepted += 1
        except MorphError as e:
            try:
                _one_line(e)
                res.clean_errors += 1
            except AssertionError as bad:
                _record(res, bad, x)
        except Hang as e:
            _record(res, e, x)
        except (Exception, RecursionError) as e:  # noqa: BLE001 - everything else is a finding
            _record(res, e, x)
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        if log and res.inputs % 1000 == 0:
            log(f"  {t.name}: {res.inputs} inputs, {len(res.findings)} findings")

    try:
        prop()
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old)
        res.seconds = time.perf_counter() - t0
        teardown = sb.state.pop("teardown", None)
        if teardown is not None:
            teardown()
        ed = sb.state.pop("editor", None)
        if ed is not None:
            ed[1].__exit__(None, None, None)
    return res


def _record(res: Result, e: BaseException, x: Any) -> None:
    kind = "hang" if isinstance(e, Hang) else type(e).__name__
    key = f"{kind} at {_where(e)}"
    f = res.findings.get(key)
    if f is None:
        r = repr(x)
        res.findings[key] = {"what": key, "message": str(e)[:300], "count": 1,
                             "first_input": r if len(r) <= 600 else r[:600] + f"... ({len(r)} chars)"}
    else:
        f["count"] += 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", action="append", help="run only these targets (repeatable)")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of each target's full input count")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--inputs", action="append", default=[], metavar="NAME=N", help="inputs for one target")
    ap.add_argument("--out", help="also write the JSON here after every target (partial results survive)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    ts = [t for t in targets() if not args.target or t.name in args.target]
    if args.target and len(ts) != len(set(args.target)):
        known = ", ".join(t.name for t in targets())
        print(f"bench: error: unknown target (known: {known})", file=sys.stderr)
        return 1
    out: dict[str, Any] = {"seed": seed, "targets": {}}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="morph-fuzz-") as tmp:
        root = Path(tmp)
        os.environ["MORPH_DATA_DIR"] = str(root / "data")
        _SAE_SEED.append(_small_sae_bytes(root))
        cwd = os.getcwd()
        os.chdir(root)
        try:
            for t in ts:
                n = dict(x.split("=") for x in args.inputs).get(t.name)
                n = int(n) if n else max(1, int(t.examples * args.scale))
                log(f"{t.name}: {n} inputs")
                sb = Sandbox(root / t.name)
                from morph import paths

                paths.set_data_dir(sb.data)
                res = run_target(t, n, sb, seed, log)
                out["targets"][t.name] = res.as_dict()
                if args.out:
                    Path(args.out).write_text(json.dumps(out, indent=2))
                log(f"{t.name}: {res.inputs} inputs in {res.seconds:.1f} s, {len(res.findings)} findings")
        finally:
            os.chdir(cwd)
    out["inputs_total"] = sum(r["inputs"] for r in out["targets"].values())
    out["seconds_total"] = round(time.perf_counter() - t_all, 1)
    out["findings_total"] = sum(len(r["findings"]) for r in out["targets"].values())
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

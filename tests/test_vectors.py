"""Control-vector GGUF: round trip, llama.cpp-style files, validation, combination."""

from __future__ import annotations

import numpy as np
import pytest

from morph.errors import MorphError
from morph.steering.vector import ControlVector, combine


def _cv(n_embd=576, layers=(3, 12), seed=0, meta=None):
    rng = np.random.default_rng(seed)
    return ControlVector({il: rng.standard_normal(n_embd).astype(np.float32) for il in layers}, "llama", meta or {})


def test_round_trip_is_exact_with_provenance(tmp_path):
    meta = {"name": "formal", "method": "diffmean", "layer": 12, "default_scale": 0.25,
            "latents": [1, 5], "weights": [0.5, 0.5], "fingerprint": "x"}
    cv = _cv(meta=meta)
    p = cv.save(tmp_path / "v.gguf")
    back = ControlVector.load(p)
    assert back.layers == [3, 12] and back.model_hint == "llama"
    for il in cv.layers:
        assert back.directions[il].dtype == np.float32
        assert np.array_equal(back.directions[il], cv.directions[il])
    assert back.meta == meta
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_bare_llama_cpp_file_loads(tmp_path):
    """A file written the way other tools write it: bare direction.N, no morph keys."""
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), arch="controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_int32("controlvector.layer_count", 2)
    v = np.linspace(-1, 1, 576, dtype=np.float32)
    for il in (1, 29):
        w.add_tensor(f"direction.{il}", v * il)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    cv = ControlVector.load(tmp_path / "bare.gguf")
    assert cv.layers == [1, 29] and cv.meta == {}
    assert np.array_equal(cv.directions[29], v * 29)
    cv.validate(576, 30)


def _write_raw(path, tensors: dict, arch="controlvector"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch=arch)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return path


@pytest.mark.parametrize("tensors,needle", [
    ({"direction.0": np.ones(576, np.float32)}, "direction.0"),
    ({"direction.3": np.ones(576, np.float16)}, "F32"),
    ({"direction.3": np.ones((2, 576), np.float32)}, "1-D"),
    ({"other": np.ones(576, np.float32)}, "no direction"),
    ({"direction.3": np.array([np.nan] * 576, np.float32)}, "NaN"),
])
def test_bad_files_name_the_file_and_problem(tmp_path, tensors, needle):
    p = _write_raw(tmp_path / "bad.gguf", tensors)
    with pytest.raises(MorphError) as e:
        ControlVector.load(p)
    assert str(p) in str(e.value) and needle in str(e.value)


def test_not_gguf_and_missing(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"hello world, not gguf at all")
    with pytest.raises(MorphError, match="not a readable GGUF"):
        ControlVector.load(p)
    with pytest.raises(MorphError, match="no such"):
        ControlVector.load(tmp_path / "missing.gguf")
    p2 = _write_raw(tmp_path / "model.gguf", {"direction.3": np.ones(576, np.float32)}, arch="llama")
    with pytest.raises(MorphError, match="architecture"):
        ControlVector.load(p2)


def test_validate_against_model():
    _cv(layers=(1, 29)).validate(576, 30)
    with pytest.raises(MorphError, match="n_embd is 640"):
        _cv().validate(640, 18)
    with pytest.raises(MorphError, match="outside the model's blocks 1..17"):
        _cv(n_embd=640, layers=(20,)).validate(640, 18)


def test_scaled_sum_and_buffer_layout():
    a, b = _cv(layers=(3,), seed=1), _cv(layers=(3, 12), seed=2)
    s = combine([(a, 0.5), (b, -2.0)])
    assert np.allclose(s.directions[3], 0.5 * a.directions[3] - 2.0 * b.directions[3])
    assert np.allclose(s.directions[12], -2.0 * b.directions[12])
    buf = s.to_buffer(576, 30).reshape(29, 576)
    assert np.array_equal(buf[2], s.directions[3])  # row k steers block k+1
    assert np.array_equal(buf[11], s.directions[12])
    assert not buf[0].any() and not buf[28].any()
    with pytest.raises(MorphError):
        _ = a + _cv(n_embd=640, layers=(3,))


def _logits_under_raw_cvec(engine, buf, text):
    """Next-token logits after `text` with `buf` handed to llama.cpp's C API directly, for
    every block (morph's engine never sees the vector), from an empty cache."""
    import ctypes

    import llama_cpp

    with engine._lock:
        engine._cvec_key = object()  # the engine no longer knows what is set
        rc = llama_cpp.llama_set_adapter_cvec(engine.llm._ctx.ctx, buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                              buf.size, engine.n_embd, 1, engine.n_layer - 1)
        assert rc == 0
        engine._reset_kv()
        engine._prime(engine.tokenize(text))
        out = engine._last_logits()
        llama_cpp.llama_set_adapter_cvec(engine.llm._ctx.ctx, None, 0, engine.n_embd, 1, engine.n_layer - 1)
        engine._cvec_key = None
        engine._reset_kv()
    return out


def test_llama_cpp_applies_our_file_like_its_own(engine, tmp_path, logit_atol):
    """A saved file read back by gguf's own reader (not morph's loader) and laid out by the
    rule of llama.cpp's control-vector loader (direction.N steers block N: row N-1 of the
    n_embd x (n_layer-1) buffer, several tensors summed) steers exactly as morph's load
    of it does (both evaluate the whole text on one context: same kernels); writing the
    file's direction into block 14's output through the eval callback (another context:
    within LOGIT_ATOL) agrees too, and the vector really moves the logits."""
    import gguf

    cv = _cv(layers=(14,), seed=5) * 3.0
    p = cv.save(tmp_path / "s.gguf")
    text = "Please find attached the"
    reader = gguf.GGUFReader(str(p))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    buf = np.zeros((engine.n_layer - 1, engine.n_embd), np.float32)
    for t in reader.tensors:
        il = int(t.name.removeprefix("direction."))
        buf[il - 1] += np.asarray(t.data, np.float32)
    theirs = _logits_under_raw_cvec(engine, buf.ravel(), text)
    ours = engine.logits(text, ControlVector.load(p))
    engine.set_steering(None)
    assert np.array_equal(theirs, ours)
    edited = engine.logits_with_edit(text, 14, lambda a: a + buf[13])
    assert np.allclose(edited, ours, rtol=0, atol=logit_atol), np.abs(edited - ours).max()
    assert not np.allclose(ours, engine.logits(text), rtol=0, atol=logit_atol)

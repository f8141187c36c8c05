"""The part of ggml's C ABI that capture and position edits rely on, checked before use.

llama-cpp-python binds llama.h but no ggml tensor accessors, so the eval callback reads
activation tensors through ctypes into the bundled `libggml-base`. The assumptions:

- functions: `ggml_get_name`, `ggml_nelements`, `ggml_nbytes`, `ggml_is_contiguous`,
  `ggml_backend_tensor_get/set` (plus `ggml_init`, `ggml_new_tensor_2d`, `ggml_set_name`,
  `ggml_type_name`, `ggml_free` for the check below);
- `struct ggml_tensor` starts with `enum ggml_type type` (int32 at offset 0), then a
  buffer pointer, then `int64_t ne[4]` at offset 16;
- `GGML_TYPE_F32 == 0` (type name "f32"), `GGML_TYPE_F16 == 1` ("f16");
- the eval callback is `bool (*)(struct ggml_tensor *, bool ask, void *)`
  (`llama_cpp.ggml_backend_sched_eval_callback`).

`check_abi()` verifies them against tensors made here with known type and shape, once
per process before the first capture, and raises a MorphError naming the assumption that
broke, so a llama-cpp-python that changed them fails clearly instead of reading garbage.
pyproject pins llama-cpp-python to the tested range; tests/test_engine.py runs the check.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Callable

import numpy as np

from morph.errors import MorphError

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
TYPE_OFFSET = 0  # byte offset of `type` in struct ggml_tensor
NE_OFFSET = 16  # byte offset of `ne[4]` (after the int32 type, padded, and a pointer)


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _abi_error(what: str) -> MorphError:
    import llama_cpp

    return MorphError(
        f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')} changed the ggml ABI morph's "
        f"capture relies on: {what} (see morph/engine/ggml.py; install the version pinned in pyproject.toml)"
    )


def _load():
    import llama_cpp

    libdir = Path(llama_cpp.__file__).resolve().parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        p = libdir / name
        if p.exists():
            lib = ctypes.CDLL(str(p))
            break
    else:
        raise MorphError(f"cannot find libggml-base in {libdir}")
    sigs = {
        "ggml_get_name": (ctypes.c_char_p, [ctypes.c_void_p]),
        "ggml_set_name": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
        "ggml_nelements": (ctypes.c_int64, [ctypes.c_void_p]),
        "ggml_nbytes": (ctypes.c_size_t, [ctypes.c_void_p]),
        "ggml_is_contiguous": (ctypes.c_bool, [ctypes.c_void_p]),
        "ggml_type_name": (ctypes.c_char_p, [ctypes.c_int]),
        "ggml_init": (ctypes.c_void_p, [_InitParams]),
        "ggml_free": (None, [ctypes.c_void_p]),
        "ggml_new_tensor_2d": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]),
        "ggml_backend_tensor_get": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
        "ggml_backend_tensor_set": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]),
    }
    for name, (res, args) in sigs.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise _abi_error(f"{p.name} no longer exports {name}") from None
        fn.restype, fn.argtypes = res, args
    return lib


def check_abi(lib=None, type_offset: int = TYPE_OFFSET, ne_offset: int = NE_OFFSET) -> None:
    """Raise MorphError naming the first broken assumption (see the module docstring)."""
    import llama_cpp

    lib = lib or _load()
    cb = getattr(llama_cpp, "ggml_backend_sched_eval_callback", None)
    want = (ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)
    if cb is None or cb._restype_ is not ctypes.c_bool or tuple(cb._argtypes_) != want:
        raise _abi_error("the eval callback is no longer bool (*)(ggml_tensor *, bool ask, void *)")
    for t, name in ((GGML_TYPE_F32, b"f32"), (GGML_TYPE_F16, b"f16")):
        if lib.ggml_type_name(t) != name:
            raise _abi_error(f"ggml type {t} is {lib.ggml_type_name(t)!r}, expected {name!r}")
    params = _InitParams(1 << 16, None, False)
    ctx = lib.ggml_init(params)
    if not ctx:
        raise _abi_error("ggml_init(struct ggml_init_params) failed")
    try:
        for typ, size, ne0, ne1 in ((GGML_TYPE_F16, 2, 7, 3), (GGML_TYPE_F32, 4, 5, 11)):
            t = lib.ggml_new_tensor_2d(ctx, typ, ne0, ne1)
            lib.ggml_set_name(t, b"morph-abi-check")
            got_type = ctypes.c_int32.from_address(t + type_offset).value
            if got_type != typ:
                raise _abi_error(f"struct ggml_tensor no longer starts with its type at offset {type_offset} "
                                 f"(read {got_type} for a tensor of type {typ})")
            ne = tuple((ctypes.c_int64 * 2).from_address(t + ne_offset))
            if ne != (ne0, ne1):
                raise _abi_error(f"struct ggml_tensor's ne[] is not at offset {ne_offset} (read {ne}, "
                                 f"expected {(ne0, ne1)})")
            if lib.ggml_nelements(t) != ne0 * ne1 or lib.ggml_nbytes(t) != size * ne0 * ne1:
                raise _abi_error(f"ggml_nelements/ggml_nbytes disagree with a {ne0}x{ne1} tensor of type {typ}")
            if lib.ggml_get_name(t) != b"morph-abi-check" or not lib.ggml_is_contiguous(t):
                raise _abi_error("ggml_get_name/ggml_is_contiguous misread a fresh tensor")
    finally:
        lib.ggml_free(ctx)


@functools.lru_cache(maxsize=1)
def libggml():
    """libggml-base with the signatures morph uses, after `check_abi` passed."""
    lib = _load()
    check_abi(lib)
    return lib


def tensor_rows(ggml, t, n_embd: int, edit: Callable[[np.ndarray], np.ndarray | None] | None = None) -> np.ndarray:
    """Read a host F32 activation tensor as (n_tokens, n_embd); if `edit` returns an array,
    write it back into the graph (everything downstream sees it) and return that."""
    n = ggml.ggml_nelements(t)
    nbytes = ggml.ggml_nbytes(t)
    typ = ctypes.c_int32.from_address(t + TYPE_OFFSET).value
    ne0 = ctypes.c_int64.from_address(t + NE_OFFSET).value
    if typ != GGML_TYPE_F32 or nbytes != n * 4 or ne0 != n_embd or not ggml.ggml_is_contiguous(t):
        raise MorphError(f"{ggml.ggml_get_name(t)!r} is not a contiguous F32 tensor of rows of {n_embd}")
    arr = np.empty((n // n_embd, n_embd), dtype=np.float32)
    ggml.ggml_backend_tensor_get(t, arr.ctypes.data, 0, nbytes)
    if edit is None:
        return arr
    new = edit(arr)
    if new is None:
        return arr
    new = np.ascontiguousarray(new, dtype=np.float32)
    if new.shape != arr.shape:
        raise MorphError("edit changed the activation shape")
    ggml.ggml_backend_tensor_set(t, new.ctypes.data, 0, nbytes)
    return new

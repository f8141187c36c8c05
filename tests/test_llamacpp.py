"""Loading llama.cpp (engine/llamacpp.py): extra buffer types off on AMX CPUs, config wins."""

from __future__ import annotations

import pytest

from morph import paths
from morph.engine import Request, collect
from morph.engine import llamacpp
from morph.engine.llama import LlamaEngine

AMX = frozenset({"avx512f", "amx_int8", "amx_tile", "amx_bf16"})
NO_AMX = frozenset({"avx2", "fma"})


@pytest.mark.parametrize("flags, expected", [(AMX, False), (NO_AMX, True)], ids=["amx", "no-amx"])
def test_engine_loads_and_generates_with_extra_buffers_by_cpu(model_info, data_dir, monkeypatch, flags, expected, threads):
    monkeypatch.setattr(llamacpp, "cpu_flags", lambda: flags)
    eng = LlamaEngine(model_info, n_ctx=256, threads=threads)
    try:
        assert eng.llm.model_params.use_extra_bufts is expected
        out = collect(eng.stream(Request(prompt="The weather today is", max_tokens=8, temperature=0)))
        assert out.text.strip() and out.timings.gen_tokens == 8
    finally:
        eng.close()


@pytest.mark.parametrize("flags, setting", [(AMX, True), (NO_AMX, False)], ids=["force-on", "force-off"])
def test_config_forces_extra_buffers_either_way(model_info, data_dir, monkeypatch, flags, setting, threads):
    monkeypatch.setattr(llamacpp, "cpu_flags", lambda: flags)
    paths.config_path().write_text(f"extra_buffer_types = {str(setting).lower()}\n", encoding="utf-8")
    assert llamacpp.extra_buffer_types() is setting
    # An explicit argument (a caller that knows better) wins over config.
    assert llamacpp.extra_buffer_types(not setting) is (not setting)
    if not setting:  # loading with them forced on would crash a real AMX machine: only load the safe way
        eng = LlamaEngine(model_info, n_ctx=256, threads=threads)
        try:
            assert eng.llm.model_params.use_extra_bufts is False
        finally:
            eng.close()


def test_cpu_flags_reads_this_machine():
    flags = llamacpp.cpu_flags()
    assert flags, "no CPU flags read from /proc/cpuinfo"
    assert llamacpp.has_amx(flags) == any(f.startswith("amx") for f in flags)

"""Loading llama.cpp (engine/llamacpp.py): extra buffer types off on AMX CPUs, config wins."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

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


def test_thread_governor_arithmetic(monkeypatch):
    """Threads = the CPUs other work leaves free (rounded), at least 1, at most `most`.
    Samples faked: (time, busy CPU-seconds of this process's CPUs, its own CPU-seconds)."""
    g = llamacpp.ThreadGovernor(4)
    g.cpus = {"cpu0", "cpu1", "cpu2", "cpu3"}
    samples = iter([(1.0, 10.0, 1.0), (2.0, 13.0, 3.0), (3.0, 17.0, 3.0), (4.0, 17.2, 3.1), (5.0, 19.6, 3.5),
                    (8.0, 31.6, 3.5), (9.0, 35.6, 3.5)])
    monkeypatch.setattr(g, "_sample", lambda: next(samples))
    g.last = g._sample()
    # 3 CPU-s busy, 2 of them ours: 1 CPU of other work, 3 left; 4 busy, none ours: 1 thread;
    # 0.1 of other work: all 4; 2.0 of other work: 2; then 3 s idle with every CPU busy all
    # along: too old to say what happens now, so all 4 until the next (fresh) window: 1
    assert [g.threads() for _ in range(6)] == [3, 1, 4, 2, 4, 1]


@contextlib.contextmanager
def busy_neighbours():
    """Processes spinning on every CPU this process may use, for about a second first."""
    spin = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in os.sched_getaffinity(0)]
    try:
        time.sleep(0.6)
        yield
    finally:
        for p in spin:
            p.kill()
            p.wait()


def test_thread_governor_gives_way_to_a_busy_neighbour():
    g = llamacpp.ThreadGovernor(len(os.sched_getaffinity(0)))
    with busy_neighbours():
        assert g.threads() == 1


def test_engine_threads_give_way_to_other_work_unless_config_says_not(model_info, data_dir):
    cpus = len(os.sched_getaffinity(0))
    if cpus < 2:
        pytest.skip("one CPU: nothing to give way")
    eng = LlamaEngine(model_info, n_ctx=256, threads=cpus)
    try:
        assert eng.adaptive
        with busy_neighbours():
            out = collect(eng.stream(Request(prompt="The weather today is", max_tokens=8, temperature=0)))
        assert out.timings.gen_tokens == 8 and eng._threads_now == 1
    finally:
        eng.close()
    paths.config_path().write_text("adaptive_threads = false\n", encoding="utf-8")
    eng = LlamaEngine(model_info, n_ctx=256, threads=cpus)
    assert not eng.adaptive and eng._governor is None
    eng.close()
    one = LlamaEngine(model_info, n_ctx=256, threads=1, adaptive_threads=True)
    assert not one.adaptive  # one thread: nothing to give
    one.close()

"""Engines behind one protocol (see base.py). `load_engine` picks one."""

from __future__ import annotations

import importlib
import importlib.util

from morph.engine.base import APPLY_MODES, BatchRunner, Completion, Engine, Event, Request, Timings, apply_factors, collect
from morph.errors import MorphError
from morph.models import ModelInfo

__all__ = ["Engine", "BatchRunner", "Event", "Request", "Timings", "Completion", "collect", "load_engine",
           "APPLY_MODES", "apply_factors"]


def load_engine(info: ModelInfo, gpu: bool = False, n_ctx: int = 4096, threads: int | None = None,
                tensor_parallel_size: int = 1, compile: bool = False, slots: int = 1) -> Engine:
    """`slots`: prompts the CPU engine keeps cached at once (2 for the editor; vLLM has its own cache)."""
    if gpu:
        return _vllm_engine_class()(info, n_ctx=n_ctx, tensor_parallel_size=tensor_parallel_size,
                                    enforce_eager=not compile)
    from morph.engine.llama import LlamaEngine

    return LlamaEngine(info, n_ctx=n_ctx, threads=threads, slots=slots)


def _vllm_engine_class():
    """morph's vLLM engine, or a MorphError that says what is missing: vLLM itself (install
    it), or morph's engine for it (vLLM is there; a pip extra would not help)."""
    try:
        return importlib.import_module("morph.engine.vllm").VllmEngine
    except (ImportError, AttributeError) as e:
        err = e
    if not _importable("vllm"):
        raise MorphError("--gpu needs vLLM, which is not installed: pip install 'morph[gpu]' "
                         "(on a machine with a CUDA GPU)")
    if isinstance(err, ModuleNotFoundError) and err.name == "morph.engine.vllm":
        raise MorphError("--gpu: vLLM is installed, but this version of morph has no vLLM engine yet "
                         "(morph.engine.vllm is missing); run without --gpu for the CPU engine")
    raise MorphError(f"--gpu: vLLM is installed, but morph's vLLM engine failed to load: {err}")


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False

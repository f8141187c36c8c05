"""Engines behind one protocol (see base.py). `load_engine` picks one."""

from __future__ import annotations

from morph.engine.base import APPLY_MODES, BatchRunner, Completion, Engine, Event, Request, Timings, apply_factors, collect
from morph.errors import MorphError
from morph.models import ModelInfo

__all__ = ["Engine", "BatchRunner", "Event", "Request", "Timings", "Completion", "collect", "load_engine",
           "APPLY_MODES", "apply_factors"]


def load_engine(info: ModelInfo, gpu: bool = False, n_ctx: int = 4096, threads: int | None = None) -> Engine:
    if gpu:
        try:
            from morph.engine.vllm import VllmEngine
        except ImportError as e:
            raise MorphError(f"--gpu needs vLLM: pip install 'morph[gpu]' ({e})") from None
        return VllmEngine(info, n_ctx=n_ctx)
    from morph.engine.llama import LlamaEngine

    return LlamaEngine(info, n_ctx=n_ctx, threads=threads)

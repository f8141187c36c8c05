"""Engines behind one protocol (see base.py). `load_engine` picks one."""

from __future__ import annotations

from morph.engine.base import Completion, Engine, Event, Request, Timings, collect
from morph.errors import MorphError
from morph.models import ModelInfo

__all__ = ["Engine", "Event", "Request", "Timings", "Completion", "collect", "load_engine"]


def load_engine(info: ModelInfo, gpu: bool = False, n_ctx: int = 4096, threads: int | None = None,
                tensor_parallel_size: int = 1, compile: bool = False) -> Engine:
    if gpu:
        try:
            from morph.engine.vllm import VllmEngine
        except ImportError as e:
            raise MorphError(f"--gpu needs vLLM: pip install 'morph[gpu]' ({e})") from None
        return VllmEngine(info, n_ctx=n_ctx, tensor_parallel_size=tensor_parallel_size, enforce_eager=not compile)
    from morph.engine.llama import LlamaEngine

    return LlamaEngine(info, n_ctx=n_ctx, threads=threads)

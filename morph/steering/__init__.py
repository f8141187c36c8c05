"""Steering: control vectors (llama.cpp GGUF) and the catalog of named features."""

from morph.steering.vector import ControlVector, combine

__all__ = ["ControlVector", "combine"]

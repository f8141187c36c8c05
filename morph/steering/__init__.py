"""Steering: control vectors (llama.cpp GGUF, vector.py) and the catalog of named features."""

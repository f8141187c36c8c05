"""morph: steer how a local language model writes, with named, interpretable features."""

__version__ = "0.1.0"

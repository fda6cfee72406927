"""inferplane: serve ML models online, on streams and in batch from one stack."""

__version__ = "0.1.0"

"""dsgdbench: a benchmark harness for decentralized and sharpness-aware optimizers."""

__version__ = "0.2.0"

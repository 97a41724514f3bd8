"""cascade-sd: relaxed speculative decoding of autoregressive image generators."""

__version__ = "0.1.0"

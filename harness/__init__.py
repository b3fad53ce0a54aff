"""spec-harness: benchmark lossless decoding acceleration against greedy autoregressive decoding."""

__version__ = "0.1.0"

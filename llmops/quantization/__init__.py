"""Quantization: llm-compressor recipes per scheme, the oneshot run, the comparison table, footprint measured in a fresh process."""

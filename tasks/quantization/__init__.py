"""What the quantize stage needs beyond evaluate's code: llm-compressor recipes per scheme, and footprint measurement."""

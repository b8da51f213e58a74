"""Serving: launch vLLM or `transformers serve` behind one key-checking proxy, then smoke- and load-test it."""

"""The data library: source readers, the validation contract, MinHash dedup, tokenizers and token statistics."""

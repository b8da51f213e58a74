"""Helpers of the evaluate stage: perplexity and generation (torch), scoring (pure), the execution sandbox."""

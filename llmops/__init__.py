"""llmops, the library: what the stages in tasks/ and the flows in flows/ call, by domain."""

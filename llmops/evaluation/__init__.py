"""Evaluation: the scores every stage shares (perplexity, sandboxed HumanEval, eval-split match), generation, pure scoring, the execution sandbox."""

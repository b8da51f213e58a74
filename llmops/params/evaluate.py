"""params.yaml `evaluate`: perplexity, sandboxed HumanEval, held-out doctests, eval-split generation and lm-evaluation-harness
tasks."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from llmops.params.base import Section

# The lm-eval tasks shipped in llmops/evaluation/lm_eval_tasks/: their data is on disk, so they run offline.
OFFLINE_LM_EVAL_TASKS = ("llmops_humaneval", "llmops_heldout_ppl")


class EvaluateConfig(Section):
    """Perplexity, HumanEval (sandboxed execution) and eval-split match of the fine-tuned model."""

    seq_len: int = Field(256, ge=8)  # perplexity block length
    eval_tokens: int = Field(50_000, ge=0)  # held-out tokens scored (0 = the whole val split)
    batch_size: int = Field(16, ge=1)  # perplexity blocks / prompts per generate call
    compare_base: bool = True  # also score the pretrained base (or model.base) for comparison
    max_problems: int = Field(20, ge=0, le=164)  # HumanEval problems, in order (164 = all; 0 = skip HumanEval)
    samples_per_problem: int = Field(1, ge=1)  # n; greedy decoding when 1, sampling otherwise
    pass_k: list[int] = Field(default_factory=lambda: [1, 10])  # pass@k reported for every k <= n
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)
    max_pairs: int = Field(50, ge=0)  # fine-tune eval split pairs generated (0 = all)
    # doctest prompts of finetune's held-out source files (whose reference passes them) scored in the sandbox; 0 = skip
    doctest_prompts: int = Field(8, ge=0)
    doctest_examples: int = Field(3, ge=1)  # doctest examples checked per prompt (the first ones), each its own program
    seed: int = 0
    timeout_s: float = Field(5.0, gt=0)  # wall clock per program
    memory_mb: int = Field(1024, ge=64)  # memory of a whole program, all its processes (cgroup); also address space per process
    max_processes: int = Field(32, ge=1)  # processes per program (stops fork bombs)
    max_file_mb: int = Field(16, ge=1)  # largest file a program may write
    workers: int = Field(0, ge=0)  # programs run at once; 0 = one per CPU core
    allow_unsandboxed: bool = False  # run generated code with rlimits only where namespaces are unavailable (unsafe)
    # lm-evaluation-harness tasks run on the candidate (llmops.evaluation.lm_eval): the offline ones, or any standard
    # lm-eval task whose dataset is cached or reachable; [] = none. Unknown names fail before any work.
    lm_eval: list[str] = Field(default_factory=lambda: list(OFFLINE_LM_EVAL_TASKS))
    lm_eval_limit: int = Field(20, ge=1)  # documents per lm-eval task, in order

    @field_validator("lm_eval")
    @classmethod
    def _task_names(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"lm_eval names a task twice: {names}")
        if bad := [n for n in names if not n.strip() or n != n.strip()]:
            raise ValueError(f"lm_eval task names must be non-empty without surrounding spaces (got {bad})")
        return names

    @model_validator(mode="after")
    def _positive_k(self) -> EvaluateConfig:
        if any(k < 1 for k in self.pass_k):
            raise ValueError(f"pass_k values must be >= 1 (got {self.pass_k})")
        return self

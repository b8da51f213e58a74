"""Instruction pairs for finetune: docstring -> body pairs mined from the corpus, or a user's JSONL,
rendered with a chat template that is saved with the tokenizer (so serving formats prompts the same way).

Rows that break a rule go to the quarantine with the file, line and rule; nothing is dropped silently.
"""

from __future__ import annotations

import ast
import hashlib
import json
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmops.common.errors import ConfigError
from llmops.common.io import read_records
from llmops.common.progress import progress
from llmops.params.finetune import FinetuneConfig

# Completion style: prompt and response are concatenated as they are, so a prompt of a signature and a
# docstring (what HumanEval gives) is continued with the body.
CODE_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
# Conversations: plain-text role markers, so any tokenizer can express them without new tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TEMPLATES = {"code": CODE_TEMPLATE, "chat": CHAT_TEMPLATE}
ROLES = {"system", "user", "assistant"}


@dataclass
class Pair:
    id: str
    source: str  # the file it came from: the unit of the train/eval split
    messages: list[dict[str, str]]  # ends with the assistant turn that is learned

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "source": self.source, "messages": self.messages}


@dataclass
class Rejected:
    where: str  # file:line or pair id
    rule: str
    row: Any

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "rule": self.rule, "row": self.row}


def in_eval_split(source: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"finetune:{seed}:{source}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def docstring_pairs(doc_id: str, text: str) -> Iterator[Pair]:
    """Every function or method with a docstring and a body: prompt = signature + docstring, response = body."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = text.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or len(node.body) < 2:
            continue
        if ast.get_docstring(node, clean=False) is None:
            continue
        doc_end = node.body[0].end_lineno or node.lineno
        if node.body[1].lineno <= doc_end or node.end_lineno is None:
            continue  # body on the docstring's own line: no clean split
        block = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
        block_lines = block.splitlines(keepends=True)
        cut = doc_end - node.lineno + 1
        prompt, response = "".join(block_lines[:cut]), "".join(block_lines[cut:])
        if not response.strip():
            continue
        if not response.endswith("\n"):
            response += "\n"
        yield Pair(
            id=f"{doc_id}::{node.name}:{node.lineno}",
            source=doc_id,
            messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        )


def jsonl_rows(path: Path, shown: str = "") -> Iterator[tuple[int, str, Any]]:
    """(line number, `file:line` as errors name it, the parsed row) for each non-blank line of a user JSONL file; a
    line that is not JSON comes as (lineno, where, Rejected) so the caller quarantines it with the reason."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{shown or path}:{lineno}"
            if not line.strip():
                continue
            try:
                yield lineno, where, json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, where, Rejected(where, f"not valid JSON ({exc.msg})", line.rstrip("\n")[:2000])


def read_jsonl_pairs(path: Path, shown: str = "") -> tuple[list[Pair], list[Rejected]]:
    """User pairs: {"prompt", "response"} or {"messages": [{role, content}, ...]} ending with the assistant."""
    pairs: list[Pair] = []
    rejected: list[Rejected] = []
    for lineno, where, row in jsonl_rows(path, shown):
        if isinstance(row, Rejected):
            rejected.append(row)
            continue
        messages, rule = _messages_of(row)
        if rule:
            rejected.append(Rejected(where, rule, row))
            continue
        row_id = str(row.get("id") or f"{path.name}:{lineno}")
        pairs.append(Pair(id=row_id, source=row_id, messages=messages))
    return pairs, rejected


def _messages_of(row: Any) -> tuple[list[dict[str, str]], str | None]:
    if not isinstance(row, dict):
        return [], f"a row must be a JSON object, got {type(row).__name__}"
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            return [], "'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return [], f"messages[{i}] must be {{'role': system|user|assistant, 'content': string}}"
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            return [], "the last message must be a non-empty 'assistant' turn (the response that is learned)"
        if not any(m["role"] == "user" for m in messages):
            return [], "'messages' has no 'user' turn"
        return [{"role": m["role"], "content": m["content"]} for m in messages], None
    prompt, response = row.get("prompt"), row.get("response")
    if not isinstance(prompt, str) or not isinstance(response, str):
        return [], "needs string fields 'prompt' and 'response', or 'messages'"
    if not prompt.strip() or not response.strip():
        return [], "empty 'prompt' or 'response'"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], None


def encode_pair(tokenizer: Any, pair: Pair, template: str) -> dict[str, list[int]]:
    """input_ids = prompt + response + EOS; labels mask the prompt.

    Prompt and response are tokenized separately, so the prompt's tokens are exactly what a server
    produces for the same prompt (BPE would otherwise merge across the boundary).
    """
    prompt = tokenizer.apply_chat_template(pair.messages[:-1], chat_template=template, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(pair.messages, chat_template=template, add_generation_prompt=False, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError(f"chat template renders {pair.id}'s prompt differently with and without its response")
    backend = tokenizer.backend_tokenizer
    prompt_ids = backend.encode(prompt, add_special_tokens=False).ids
    response_ids = backend.encode(full[len(prompt) :], add_special_tokens=False).ids + [tokenizer.eos_token_id]
    return {"input_ids": prompt_ids + response_ids, "labels": [-100] * len(prompt_ids) + response_ids}


def build_pairs(cfg: FinetuneConfig, seed: int, dedup_dir: Path, root: Path) -> tuple[list[Pair], list[Pair], list[Rejected], dict[str, int]]:
    """(train, eval, rejected, counts) from `finetune.data` (relative to the repository `root`) or the corpus in
    `dedup_dir`; train and eval never share a source file (corpus) or row."""
    counts: dict[str, int] = {}
    if cfg.data:
        path = Path(root) / cfg.data
        if not path.is_file():
            raise ConfigError(f"params.yaml: finetune.data={cfg.data!r} is not a file (expected JSONL of prompt/response or messages)")
        pairs, rejected = read_jsonl_pairs(path, shown=cfg.data)  # quarantine rows name the file as params.yaml does
        counts["rows"] = len(pairs) + len(rejected)
    else:
        table = read_records(dedup_dir)
        pairs, rejected = [], []
        docs = list(zip(table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True))
        for doc_id, text in progress(docs, desc="finetune: mining docstring pairs", unit="doc"):
            pairs.extend(docstring_pairs(doc_id, text))
        counts["documents"] = len(docs)
    train = [p for p in pairs if not in_eval_split(p.source, cfg.eval_fraction, seed)]
    held = [p for p in pairs if in_eval_split(p.source, cfg.eval_fraction, seed)]
    if not held and len(train) > 1:
        held.append(train.pop())
    counts["candidates"] = len(pairs)
    return train, held, rejected, counts


def cap_pairs(pairs: list[Pair], limit: int) -> list[Pair]:
    """A deterministic subset (by id hash), so a cap never depends on file order."""
    if not limit or len(pairs) <= limit:
        return pairs
    return sorted(pairs, key=lambda p: hashlib.sha256(p.id.encode()).digest())[:limit]


def encode_pairs(tokenizer: Any, pairs: list[Pair], cfg: FinetuneConfig, rejected: list[Rejected]) -> list[dict[str, list[int]]]:
    out = []
    template = TEMPLATES[cfg.template]
    for pair in pairs:
        example = encode_pair(tokenizer, pair, template)
        if len(example["input_ids"]) > cfg.max_seq_len:
            rejected.append(Rejected(pair.id, f"too long: {len(example['input_ids'])} tokens > finetune.max_seq_len={cfg.max_seq_len}", pair.to_json()))
            continue
        out.append(example)
    return out

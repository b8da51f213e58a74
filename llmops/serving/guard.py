"""What the proxy checks in a client's request before the backend sees it: JSON shape and depth, known model, field types, and
prompt + max_tokens within the model's context and the KV cache; the request forwarded is rebuilt from the checked fields.

Errors are OpenAI-style 4xx (`RequestError.body()`), never a backend crash: an over-long prompt used to overflow
transformers' paged KV cache and kill its batching worker, and an absent or huge max_tokens generated until the cache
was full. Token counts use the served model's tokenizer.json and chat template (no torch import); a prompt whose UTF-8
length already fits is not tokenized at all, since a byte-level or sentencepiece tokenizer never makes more tokens
than bytes (plus the special tokens it adds).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Fields each route accepts: the OpenAI API's text fields. Backend extensions (transformers' generation_config and
# chat_template_kwargs, vLLM's guided decoding, tools) are refused: each is a way around the limits below.
COMPLETION_FIELDS = frozenset(
    {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "best_of", "stream", "stream_options", "stop", "seed",
     "frequency_penalty", "presence_penalty", "logprobs", "echo", "suffix", "user", "logit_bias"}
)  # fmt: skip
CHAT_FIELDS = frozenset(
    {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop",
     "seed", "frequency_penalty", "presence_penalty", "logprobs", "top_logprobs", "user", "logit_bias"}
)  # fmt: skip
EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})
ROUTE_FIELDS = {"v1/completions": COMPLETION_FIELDS, "v1/chat/completions": CHAT_FIELDS, "v1/embeddings": EMBEDDING_FIELDS}
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant"})
MESSAGE_FIELDS = frozenset({"role", "content", "name"})
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300
MAX_EMBEDDING_INPUTS = 2048
MAX_SHORT_STRING_CHARS = 256  # user, name


class RequestError(Exception):
    """A request refused before it reached the backend; `body()` is the OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str = "invalid_request", kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """Per-request limits. `context_tokens` bounds prompt + max_tokens; `kv_cache_tokens` (transformers backend) too."""

    context_tokens: int
    kv_cache_tokens: int = 0  # 0 = the backend manages its own cache (vLLM)
    max_tokens: int = 0  # cap on max_tokens; 0 = whatever the context leaves after the prompt
    max_n: int = 4  # choices per request: n (or best_of) x prompts
    max_json_depth: int = 32

    @property
    def tokens_per_request(self) -> int:
        return min(self.context_tokens, self.kv_cache_tokens) if self.kv_cache_tokens else self.context_tokens

    def describe(self) -> str:
        kv = f", KV cache {self.kv_cache_tokens}" if self.kv_cache_tokens else ""
        return f"{self.tokens_per_request} tokens per request (context {self.context_tokens}{kv})"


@dataclass(frozen=True)
class Checked:
    """A request that passed: the body to forward and the tokens it may hold in the backend at most."""

    payload: dict[str, Any]
    stream: bool
    sequences: int  # prompts x choices generated in the backend
    tokens_per_sequence: int  # prompt + max_tokens of the longest sequence (an upper bound)


class PromptTokens:
    """Prompt token counts with the served model's own tokenizer.json and chat template.

    `count` is exact where tokenizer.json exists (the tokenizer `transformers serve` and vLLM load); without one it
    falls back to `upper_bound`, which only ever refuses too much, never too little.
    """

    def __init__(self, tokenizer: Any | None, chat_template: str | None, template_vars: dict[str, str], vocab_size: int, special_tokens: int):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.template_vars = template_vars
        self.vocab_size = vocab_size
        self.special_tokens = special_tokens

    @classmethod
    def from_model_dir(cls, path: Path, config_dir: Path | None = None) -> PromptTokens:
        """Read tokenizer.json, the chat template (chat_template.jinja or tokenizer_config.json) and vocab_size (config.json)."""
        path = Path(path)
        tokenizer_config = _json_or_empty(path / "tokenizer_config.json")
        config = _json_or_empty(Path(config_dir or path) / "config.json")
        tokenizer = None
        special = int(bool(tokenizer_config.get("add_bos_token"))) + int(bool(tokenizer_config.get("add_eos_token")))
        if (path / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            special = max(special, len(tokenizer.encode("", add_special_tokens=True).ids))
        template = (path / "chat_template.jinja").read_text() if (path / "chat_template.jinja").exists() else tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        template_vars = {k: _token_text(v) for k, v in tokenizer_config.items() if k.endswith("_token") and _token_text(v)}
        vocab = int(config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or (tokenizer.get_vocab_size(with_added_tokens=True) if tokenizer else 0))
        return cls(tokenizer, template, template_vars, vocab, special)

    def upper_bound(self, text: str, special: bool) -> int:
        """Tokens `text` can make at most: its UTF-8 bytes after normalization, + 1 (a prefix space), + special tokens."""
        normalizer = self.tokenizer.normalizer if self.tokenizer is not None else None
        normalized = normalizer.normalize_str(text) if normalizer is not None else text
        return len(normalized.encode("utf-8", "surrogatepass")) + 1 + (self.special_tokens if special else 0)

    def count(self, text: str, special: bool) -> int:
        if self.tokenizer is None:
            return self.upper_bound(text, special)
        return len(self.tokenizer.encode(text, add_special_tokens=special).ids)

    def chat_text(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text the chat template renders (text parts joined with a space, as `transformers serve` does)."""
        if not self.chat_template:
            raise RequestError(400, "this model has no chat template: use /v1/completions", param="messages", code="no_chat_template")
        from transformers.utils.chat_template_utils import render_jinja_template

        flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else " ".join(p["text"] for p in m["content"])} for m in messages]
        try:
            rendered, _ = render_jinja_template([flat], chat_template=self.chat_template, add_generation_prompt=True, **self.template_vars)
        except Exception as exc:  # the template's own raise_exception (e.g. roles out of order) is the client's error
            raise RequestError(400, f"the chat template refused these messages: {exc}", param="messages") from None
        return rendered[0]


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _token_text(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


def json_depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(body: bytes, max_depth: int) -> dict[str, Any]:
    """The body as a JSON object, refused when malformed, not an object, or nested deeper than `max_depth`."""
    try:
        payload = json.loads(body)
    except RecursionError:  # CPython's decoder stops near its recursion limit: far deeper than any API request
        raise RequestError(400, f"JSON nested deeper than {max_depth} levels", code="json_too_deep") from None
    except ValueError as exc:
        raise RequestError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise RequestError(400, f"the body must be a JSON object, not {type(payload).__name__}", code="invalid_json")
    if json_depth(payload) > max_depth:
        raise RequestError(400, f"JSON nested deeper than {max_depth} levels", code="json_too_deep")
    return payload


def _type_error(name: str, expected: str, value: Any) -> RequestError:
    return RequestError(400, f"'{name}' must be {expected}, got {type(value).__name__}", param=name, code="invalid_type")


def _int(payload: dict, name: str, lo: int, hi: int) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if type(value) is not int:  # bool is an int subclass: true is not a token count
        raise _type_error(name, "an integer", value)
    if not lo <= value <= hi:
        raise RequestError(400, f"'{name}' must be between {lo} and {hi}, got {value}", param=name, code="invalid_value")
    return value


def _number(payload: dict, name: str, lo: float, hi: float) -> None:
    value = payload.get(name)
    if value is None:
        return
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _type_error(name, "a number", value)
    if not lo <= value <= hi:
        raise RequestError(400, f"'{name}' must be between {lo} and {hi}, got {value}", param=name, code="invalid_value")


def _bool(payload: dict, name: str) -> bool:
    value = payload.get(name, False)
    if value is None:
        return False
    if type(value) is not bool:
        raise _type_error(name, "true or false", value)
    return value


def _short_string(value: Any, name: str) -> None:
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    if len(value) > MAX_SHORT_STRING_CHARS:
        raise RequestError(400, f"'{name}' is longer than {MAX_SHORT_STRING_CHARS} characters", param=name, code="invalid_value")


def _token_ids(value: list, name: str, vocab_size: int) -> list[int]:
    if not value or not all(type(t) is int and 0 <= t < vocab_size for t in value):
        raise RequestError(400, f"'{name}' token ids must be a non-empty list of integers in [0, {vocab_size})", param=name, code="invalid_value")
    return value


def _check_common(payload: dict, vocab_size: int) -> bool:
    """Sampling and output fields both generation routes share; returns `stream`."""
    _number(payload, "temperature", 0.0, 2.0)
    _number(payload, "top_p", 0.0, 1.0)
    _number(payload, "frequency_penalty", -2.0, 2.0)
    _number(payload, "presence_penalty", -2.0, 2.0)
    _int(payload, "seed", -(2**63), 2**63 - 1)
    stream = _bool(payload, "stream")
    options = payload.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise RequestError(400, "'stream_options' must be an object with at most 'include_usage'", param="stream_options", code="invalid_value")
        _bool(options, "include_usage")
    stop = payload.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops) or len(stops) > MAX_STOP_SEQUENCES:
            raise RequestError(400, f"'stop' must be a string or up to {MAX_STOP_SEQUENCES} non-empty strings of at most {MAX_STOP_CHARS} characters", param="stop", code="invalid_value")
    bias = payload.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
            raise RequestError(400, f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids", param="logit_bias", code="invalid_value")
        for key, value in bias.items():
            if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size or type(value) not in (int, float) or not -100 <= value <= 100:
                raise RequestError(400, f"'logit_bias' maps token ids in [0, {vocab_size}) to numbers in [-100, 100]; got {key!r}: {value!r}", param="logit_bias", code="invalid_value")
    if "user" in payload:
        _short_string(payload["user"], "user")
    return stream


def _choices(payload: dict, limits: Limits, prompts: int) -> int:
    n = _int(payload, "n", 1, limits.max_n) or 1
    best_of = _int(payload, "best_of", 1, limits.max_n) or n
    if best_of < n:
        raise RequestError(400, f"'best_of' ({best_of}) must be at least 'n' ({n})", param="best_of", code="invalid_value")
    if prompts * best_of > limits.max_n:
        raise RequestError(400, f"{prompts} prompts x {best_of} choices exceeds this server's limit of {limits.max_n} per request", param="n", code="invalid_value")
    return prompts * best_of


def _max_tokens(payload: dict, prompt_tokens: list[int], counted_exactly: bool, limits: Limits) -> tuple[int | None, int]:
    """(max_tokens to forward or None to recount exactly, the longest prompt + max_tokens); refuses what cannot fit."""
    budget = limits.tokens_per_request
    cap = min(limits.max_tokens, budget) if limits.max_tokens else budget
    name = "max_completion_tokens" if payload.get("max_completion_tokens") is not None else "max_tokens"
    requested = _int(payload, name, 1, 2**62)
    if requested is not None and requested > cap:
        raise RequestError(400, f"'{name}' is {requested}; this server allows at most {cap} ({limits.describe()})", param=name, code="invalid_value")
    longest = max(prompt_tokens)
    if requested is None:
        if not counted_exactly:
            return None, 0
        requested = min(cap, budget - longest)
    if longest + requested > budget:
        if not counted_exactly:
            return None, 0
        raise RequestError(
            400, f"the prompt is {longest} tokens and {name} {requested}: together more than {limits.describe()}. Shorten the prompt or lower {name}.",
            param="messages" if "messages" in payload else "prompt", code="context_length_exceeded",
        )  # fmt: skip
    return requested, longest + requested


def _prompts(payload: dict, tokens: PromptTokens, exact: bool) -> list[int]:
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return [len(_token_ids(prompt, "prompt", tokens.vocab_size))]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError(400, "'prompt' must be a non-empty string, a list of strings, or token ids", param="prompt", code="invalid_type")
    counts = []
    for item in prompt:
        if isinstance(item, list):
            counts.append(len(_token_ids(item, "prompt", tokens.vocab_size)))
        elif isinstance(item, str) and item:
            counts.append(tokens.count(item, special=True) if exact else tokens.upper_bound(item, special=True))
        else:
            raise RequestError(400, "each prompt must be a non-empty string or a list of token ids", param="prompt", code="invalid_type")
    return counts


def _messages(payload: dict) -> list[dict[str, Any]]:
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages", code="invalid_type")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or set(message) - MESSAGE_FIELDS or "content" not in message:
            raise RequestError(400, f"{where} must be an object with 'role', 'content' and optionally 'name'", param=where, code="invalid_type")
        if message.get("role") not in CHAT_ROLES:
            raise RequestError(400, f"{where}.role must be one of {sorted(CHAT_ROLES)}", param=f"{where}.role", code="invalid_value")
        if "name" in message:
            _short_string(message["name"], f"{where}.name")
        content = message["content"]
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) and set(p) == {"type", "text"} for p in content):
                raise RequestError(400, f"{where}.content parts must be {{'type': 'text', 'text': str}}: this server serves text only", param=f"{where}.content", code="invalid_type")
        elif not isinstance(content, str):
            raise _type_error(f"{where}.content", "a string or a list of text parts", content)
    return messages


def check_generation(route: str, payload: dict, tokens: PromptTokens, limits: Limits) -> Checked:
    """Check a completion or chat completion; the returned payload always carries an explicit max_tokens."""
    stream = _check_common(payload, tokens.vocab_size)
    forward = dict(payload)
    if route == "v1/completions":
        _bool(payload, "echo")
        _int(payload, "logprobs", 0, 5)
        if payload.get("suffix") is not None and not isinstance(payload["suffix"], str):
            raise _type_error("suffix", "a string", payload["suffix"])

        def count(exact: bool) -> list[int]:
            return _prompts(payload, tokens, exact)
    else:
        _bool(payload, "logprobs")
        _int(payload, "top_logprobs", 0, 20)
        text = tokens.chat_text(_messages(payload))
        if not text:
            raise RequestError(400, "the messages render to an empty prompt", param="messages", code="invalid_value")

        def count(exact: bool) -> list[int]:
            return [tokens.count(text, special=False) if exact else tokens.upper_bound(text, special=False)]

    prompt_tokens = count(exact=False)
    sequences = _choices(payload, limits, len(prompt_tokens))
    max_tokens, longest = _max_tokens(payload, prompt_tokens, tokens.tokenizer is None, limits)
    if max_tokens is None:  # the cheap bound did not settle it: count exactly
        max_tokens, longest = _max_tokens(payload, count(exact=True), True, limits)
    forward.pop("max_completion_tokens", None)
    forward["max_tokens"] = max_tokens
    return Checked(forward, stream, sequences, longest)


def check_embedding(payload: dict, tokens: PromptTokens, limits: Limits) -> Checked:
    value = payload.get("input")
    if isinstance(value, str) or (isinstance(value, list) and value and all(type(t) is int for t in value)):
        value = [value]
    if not isinstance(value, list) or not 0 < len(value) <= MAX_EMBEDDING_INPUTS:
        raise RequestError(400, f"'input' must be a non-empty string, token ids, or a list of up to {MAX_EMBEDDING_INPUTS} of them", param="input", code="invalid_type")
    longest = 0
    for item in value:
        if isinstance(item, str) and item:
            n = tokens.upper_bound(item, special=True)
            if n > limits.tokens_per_request:
                n = tokens.count(item, special=True)
        elif isinstance(item, list):
            n = len(_token_ids(item, "input", tokens.vocab_size))
        else:
            raise RequestError(400, "each input must be a non-empty string or a list of token ids", param="input", code="invalid_type")
        if n > limits.tokens_per_request:
            raise RequestError(400, f"an input is {n} tokens: more than {limits.describe()}", param="input", code="context_length_exceeded")
        longest = max(longest, n)
    if payload.get("encoding_format", "float") not in ("float", "base64"):
        raise RequestError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format", code="invalid_value")
    _int(payload, "dimensions", 1, 1 << 16)
    if "user" in payload:
        _short_string(payload["user"], "user")
    return Checked(dict(payload), False, len(value), longest)


def check_request(route: str, payload: dict, models: dict[str, str], tokens: PromptTokens, limits: Limits) -> Checked:
    """Refuse unknown fields, an unknown model and anything that cannot fit; the forwarded payload names the backend's model id."""
    unknown = sorted(set(payload) - ROUTE_FIELDS[route])
    if unknown:
        raise RequestError(400, f"unsupported field(s) for /{route}: {', '.join(unknown)}", param=unknown[0], code="unsupported_field")
    model = payload.get("model")
    if not isinstance(model, str):
        raise _type_error("model", "a string", model)
    if model not in models:
        raise RequestError(404, f"the model '{model[:100]}' does not exist; GET /v1/models lists the served ones", param="model", code="model_not_found")
    checked = check_embedding(payload, tokens, limits) if route == "v1/embeddings" else check_generation(route, payload, tokens, limits)
    checked.payload["model"] = models[model]
    return checked

"""The proxy's request checks on in-memory requests: token counts against the model's own tokenizer, JSON shape, field types, limits."""

from __future__ import annotations

import asyncio
import json

import pytest

from llmops.serving.guard import Limits, PromptTokens, RequestError, check_request, parse_json
from llmops.serving.proxy import KvBudget

pytestmark = pytest.mark.unit

MODELS = {"micro": "/models/micro"}
LIMITS = Limits(context_tokens=256, kv_cache_tokens=8192, max_n=4)
COMPLETIONS, CHAT = "v1/completions", "v1/chat/completions"
AWKWARD_TEXTS = ["def f(x):\n    return x\n", "", " ", "\ufdfa\ufb01 ligatures", "emoji 🙂🙂🙂 and ünïcödé", "<|endoftext|><|pad|><|endoftext|>", "\x00\x01\x02", "a" * 300, "x = 1\n" * 40]


@pytest.fixture(scope="module")
def tokens(micro_model) -> PromptTokens:
    return PromptTokens.from_model_dir(micro_model)


@pytest.fixture(scope="module")
def hf_tokenizer(micro_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(micro_model)


def refused(payload: dict, tokens: PromptTokens, route: str = COMPLETIONS, limits: Limits = LIMITS) -> RequestError:
    with pytest.raises(RequestError) as caught:
        check_request(route, payload, MODELS, tokens, limits)
    return caught.value


def test_token_counts_match_the_tokenizer_transformers_serve_loads(tokens, hf_tokenizer):
    for text in AWKWARD_TEXTS:
        assert tokens.count(text, special=True) == len(hf_tokenizer(text)["input_ids"]), repr(text)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "def add(a, b):"}]
    rendered = tokens.chat_text(messages)
    assert tokens.count(rendered, special=False) == len(hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def test_the_cheap_bound_is_never_below_the_exact_count(tokens):
    for text in AWKWARD_TEXTS:
        assert tokens.upper_bound(text, special=True) >= tokens.count(text, special=True), repr(text)


def test_a_prompt_that_fits_gets_an_explicit_max_tokens_of_what_the_context_leaves(tokens):
    checked = check_request(COMPLETIONS, {"model": "micro", "prompt": "def f(x):"}, MODELS, tokens, LIMITS)

    prompt_tokens = tokens.count("def f(x):", special=True)
    assert checked.payload == {"model": "/models/micro", "prompt": "def f(x):", "max_tokens": 256 - prompt_tokens}
    assert checked.tokens_per_sequence == 256 and checked.sequences == 1 and not checked.stream


def test_max_tokens_is_capped_by_serve_max_tokens_and_max_completion_tokens_is_forwarded_as_max_tokens(tokens):
    capped = Limits(context_tokens=256, max_tokens=16)
    assert check_request(CHAT, {"model": "micro", "messages": [{"role": "user", "content": "hi"}]}, MODELS, tokens, capped).payload["max_tokens"] == 16
    checked = check_request(CHAT, {"model": "micro", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 8}, MODELS, tokens, capped)
    assert checked.payload["max_tokens"] == 8 and "max_completion_tokens" not in checked.payload
    assert refused({"model": "micro", "prompt": "x", "max_tokens": 17}, tokens, limits=capped).param == "max_tokens"


@pytest.mark.parametrize(
    ("limits", "prompt_tokens", "named"),
    [(Limits(context_tokens=256), 300, "context 256"), (Limits(context_tokens=4096, kv_cache_tokens=512), 600, "KV cache 512")],
)
def test_a_prompt_longer_than_the_context_or_the_kv_cache_is_refused_naming_the_limit(tokens, limits, prompt_tokens, named):
    prompt = "x = 1\n" * prompt_tokens  # "x = 1\n" is several tokens: well past the limit
    error = refused({"model": "micro", "prompt": prompt, "max_tokens": 1}, tokens, limits=limits)
    assert (error.status, error.code, error.param) == (400, "context_length_exceeded", "prompt")
    assert named in error.message and str(tokens.count(prompt, special=True)) in error.message


def test_prompt_plus_max_tokens_is_checked_exactly_at_the_boundary(tokens):
    prompt = "def f(x):"
    room = 256 - tokens.count(prompt, special=True)
    assert check_request(COMPLETIONS, {"model": "micro", "prompt": prompt, "max_tokens": room}, MODELS, tokens, LIMITS).tokens_per_sequence == 256
    assert refused({"model": "micro", "prompt": prompt, "max_tokens": room + 1}, tokens).code == "context_length_exceeded"


def test_absurd_max_tokens_and_n_are_refused(tokens):
    assert refused({"model": "micro", "prompt": "x", "max_tokens": 10**9}, tokens).param == "max_tokens"
    assert refused({"model": "micro", "prompt": "x", "n": 10**6}, tokens).param == "n"
    assert refused({"model": "micro", "prompt": ["a", "b", "c"], "n": 2}, tokens).param == "n"  # 6 choices > max_n 4
    assert refused({"model": "micro", "prompt": "x", "best_of": 10**6}, tokens).param == "best_of"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", 123), ("prompt", {"a": 1}), ("prompt", ""), ("prompt", []), ("prompt", [1, 10**9]), ("max_tokens", "5"),
        ("max_tokens", True), ("max_tokens", 0), ("max_tokens", 1.5), ("stream", "yes"), ("temperature", "hot"),
        ("temperature", float("nan")), ("n", 0), ("stop", ["a"] * 5), ("logit_bias", {"²": 1}), ("logit_bias", {"1": 1000}),
        ("stream_options", {"include_usage": True, "extra": 1}), ("user", "u" * 1000), ("seed", "1"),
    ],
)  # fmt: skip
def test_wrong_types_and_values_are_refused_naming_the_field(tokens, field, value):
    error = refused({"model": "micro", "prompt": "x", "max_tokens": 1} | {field: value}, tokens)
    assert error.status == 400 and error.param.startswith(field)


@pytest.mark.parametrize(
    "messages",
    ["hi", [], ["hi"], [{"role": "root", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 5}],
     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}], [{"role": "user", "content": "x", "tool_calls": []}]],
)  # fmt: skip
def test_malformed_messages_are_refused(tokens, messages):
    assert refused({"model": "micro", "messages": messages}, tokens, route=CHAT).param.startswith("messages")


def test_unknown_models_fields_and_backend_extensions_are_refused(tokens):
    error = refused({"model": "gpt-4", "prompt": "x"}, tokens)
    assert (error.status, error.code) == (404, "model_not_found")
    assert refused({"model": 7, "prompt": "x"}, tokens).param == "model"
    for extension in ("generation_config", "chat_template_kwargs", "guided_json", "tools"):
        error = refused({"model": "micro", "prompt": "x", extension: {}}, tokens)
        assert (error.code, error.param) == ("unsupported_field", extension)


def test_malformed_and_deeply_nested_json_is_refused():
    for body in (b"{", b"not json", b"\xff\xfe", b"[1, 2]", b'"text"'):
        with pytest.raises(RequestError) as caught:
            parse_json(body, 32)
        assert (caught.value.status, caught.value.code) == (400, "invalid_json")
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000, json.dumps({"model": [[[[[[1]]]]]]}).encode()):
        with pytest.raises(RequestError) as caught:
            parse_json(body, 5)
        assert (caught.value.status, caught.value.code) == (400, "json_too_deep")
    assert parse_json(b'{"model": "m", "messages": [{"content": [{"text": "x"}]}]}', 5)["model"] == "m"


def test_token_ids_must_be_in_the_vocabulary(tokens):
    assert check_request(COMPLETIONS, {"model": "micro", "prompt": [5, 6, 7], "max_tokens": 2}, MODELS, tokens, LIMITS).tokens_per_sequence == 5
    for prompt in ([tokens.vocab_size], [-1], [[1], [2, "x"]]):
        assert refused({"model": "micro", "prompt": prompt, "max_tokens": 1}, tokens).param == "prompt"


def test_kv_budget_serves_requests_in_order_and_returns_a_cancelled_waiters_blocks():
    async def scenario() -> list[str]:
        budget, order = KvBudget(4), []

        async def request(name: str, blocks: int, hold_s: float) -> None:
            await budget.acquire(blocks)
            order.append(name)
            await asyncio.sleep(hold_s)
            budget.release(blocks)

        first = asyncio.create_task(request("a", 3, 0.05))
        await asyncio.sleep(0)
        big = asyncio.create_task(request("big", 4, 0.0))  # waits for a
        await asyncio.sleep(0)
        small = asyncio.create_task(request("small", 1, 0.0))  # fits now, but waits behind big: first come, first served
        cancelled = asyncio.create_task(request("cancelled", 4, 0.0))
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.gather(first, big, small, return_exceptions=True)
        assert budget.free == 4 and not budget.waiting
        return order

    assert asyncio.run(scenario()) == ["a", "big", "small"]

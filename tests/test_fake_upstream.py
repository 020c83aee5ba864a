"""Tests of bench/fake_upstream.py, run as a real subprocess and driven by the official SDKs."""

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.support.upstream import CONTROL, fake_upstream

ROOT = Path(__file__).resolve().parents[1]
WORDS5 = "chunk 0 chunk 1 chunk 2 chunk 3 chunk 4"
USER_HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def upstream():
    """Base URL of a fake upstream subprocess (5 chunks, no delay by default)."""
    with fake_upstream(chunks=5) as base:
        yield base


@pytest.fixture
def oai(upstream):
    with openai.OpenAI(base_url=f"{upstream}/v1", api_key="sk-test", max_retries=0) as client:
        yield client


@pytest.fixture
def claude(upstream):
    with anthropic.Anthropic(base_url=upstream, api_key="sk-ant-test", max_retries=0) as client:
        yield client


def stats(upstream):
    return CONTROL.get(f"{upstream}/_fake/stats").json()


def reset(upstream):
    CONTROL.post(f"{upstream}/_fake/reset").raise_for_status()


def wait_for(predicate, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_chat_stream_text_equals_non_stream_text(oai):
    """Chat completions: streamed deltas join to the non-stream text; usage counts chunks."""
    full = oai.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x" * 40}]
    )
    assert full.object == "chat.completion"
    assert full.choices[0].message.content == WORDS5
    assert full.choices[0].finish_reason == "stop"
    usage = full.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 5, 16)
    assert usage.prompt_tokens_details.cached_tokens == 0

    with oai.chat.completions.create(model="fake-model", messages=USER_HI, stream=True) as stream:
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
    )
    assert all(c.choices and c.usage is None for c in chunks)


def test_chat_usage_chunk_only_when_asked(oai):
    """A choices-less usage chunk ends the stream only with stream_options.include_usage."""
    with oai.chat.completions.create(
        model="fake-model@chunks=3",
        messages=USER_HI,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == 3
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"


def test_chat_tool_call_stream_and_non_stream(oai):
    """With tools and "use tool" the fake answers with one tool call, streamed as argument deltas."""
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "please use tool"}]
    full = oai.chat.completions.create(model="fake-model", messages=messages, tools=tools)
    call = full.choices[0].message.tool_calls[0]
    assert (full.choices[0].finish_reason, call.function.name) == ("tool_calls", "lookup")
    assert call.function.arguments == f'{{"query": "{WORDS5}"}}'

    with oai.chat.completions.stream(model="fake-model", messages=messages, tools=tools) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0].message.tool_calls[0]
    assert (streamed.function.name, streamed.function.arguments) == (
        "lookup",
        call.function.arguments,
    )
    assert final.choices[0].finish_reason == "tool_calls"


def test_responses_stream_and_non_stream(oai):
    """Responses API: event sequence, sequence numbers, text and usage match the non-stream reply."""
    full = oai.responses.create(model="fake-model", input="hello there", instructions="be brief")
    assert (full.status, full.output_text) == ("completed", WORDS5)
    assert (full.usage.input_tokens, full.usage.output_tokens, full.usage.total_tokens) == (
        5,
        5,
        10,
    )
    assert full.usage.input_tokens_details.cached_tokens == 0
    assert full.usage.output_tokens_details.reasoning_tokens == 0

    with oai.responses.stream(
        model="fake-model", input="hello there", instructions="be brief"
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[4:9] == ["response.output_text.delta"] * 5
    assert kinds[9:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == full.output_text
    assert final.usage.total_tokens == 10


def test_anthropic_messages_stream_and_non_stream(claude):
    """Messages: non-stream and accumulated stream agree on text and usage."""
    full = claude.messages.create(model="claude-fake", max_tokens=50, messages=USER_HI)
    assert (full.content[0].text, full.stop_reason) == (WORDS5, "end_turn")
    assert (full.usage.input_tokens, full.usage.output_tokens) == (1, 5)

    with claude.messages.create(
        model="claude-fake", max_tokens=50, messages=USER_HI, stream=True
    ) as stream:
        events = list(stream)
    assert [e.type for e in events[:2]] == ["message_start", "content_block_start"]
    assert events[0].message.usage.output_tokens == 1
    assert [e.type for e in events[-3:]] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2].usage.output_tokens == 5

    with claude.messages.stream(model="claude-fake", max_tokens=50, messages=USER_HI) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == full.content[0].text
    assert final.usage.output_tokens == full.usage.output_tokens


def test_anthropic_cache_tokens(claude):
    """A cache_control prefix is written on first sight and read on the next calls, streamed too."""
    system = [
        {"type": "text", "text": f"{uuid.uuid4()} " * 10, "cache_control": {"type": "ephemeral"}}
    ]
    kwargs = {"model": "claude-fake", "max_tokens": 50, "system": system, "messages": USER_HI}
    first = claude.messages.create(**kwargs).usage
    second = claude.messages.create(**kwargs).usage
    assert first.cache_creation_input_tokens > 0 and first.cache_read_input_tokens == 0
    assert second.cache_read_input_tokens == first.cache_creation_input_tokens
    assert second.cache_creation_input_tokens == 0
    with claude.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message().usage
    assert streamed.cache_read_input_tokens == first.cache_creation_input_tokens


def test_anthropic_tool_use(claude):
    """With tools and "use tool" the reply is a tool_use block, streamed as input_json_delta."""
    tools = [{"name": "lookup", "input_schema": {"type": "object"}}]
    kwargs = {
        "model": "claude-fake",
        "max_tokens": 50,
        "tools": tools,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "use tool now"}]}],
    }
    full = claude.messages.create(**kwargs)
    block = full.content[0]
    assert (full.stop_reason, block.type, block.name, block.input) == (
        "tool_use",
        "tool_use",
        "lookup",
        {"query": WORDS5},
    )
    with claude.messages.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert any(
        e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events
    )
    assert (final.content[0].name, final.content[0].input) == ("lookup", {"query": WORDS5})


def test_count_tokens_and_models(claude, oai):
    """count_tokens follows chars // 4 + 1; both models list shapes parse."""
    count = claude.messages.count_tokens(
        model="claude-fake", messages=[{"role": "user", "content": "hello world"}]
    )
    assert count.input_tokens == 3
    assert [m.id for m in oai.models.list()] == ["fake-model", "fake-embedding-model"]
    assert [m.id for m in claude.models.list()] == ["fake-model", "fake-embedding-model"]


def test_embeddings(oai):
    """Embeddings are deterministic per input, sized by dimensions, with prompt token usage."""
    first = oai.embeddings.create(
        model="fake-embedding-model", input=["abcdefgh", "other"], dimensions=4
    )
    again = oai.embeddings.create(model="fake-embedding-model", input="abcdefgh", dimensions=4)
    assert [d.index for d in first.data] == [0, 1]
    assert len(first.data[0].embedding) == 4
    assert first.data[0].embedding == again.data[0].embedding != first.data[1].embedding
    assert first.usage.prompt_tokens == first.usage.total_tokens == 4


def test_status_500_in_each_provider_shape(oai, claude):
    """status=500 fails at once with the provider's own error JSON."""
    with pytest.raises(openai.InternalServerError) as err:
        oai.chat.completions.create(model="fake-model@status=500", messages=USER_HI)
    assert err.value.body["type"] == "server_error"
    with pytest.raises(anthropic.InternalServerError) as err:
        claude.messages.create(
            model="claude-fake@status=500", max_tokens=5, messages=USER_HI, stream=True
        )
    assert err.value.body["error"]["type"] == "api_error"


def test_status_429_has_retry_after(oai, claude):
    """status=429 is a rate-limit error carrying retry-after: 1."""
    with pytest.raises(openai.RateLimitError) as err:
        oai.chat.completions.create(
            model="fake-model", messages=USER_HI, extra_headers={"x-fake-scenario": "status=429"}
        )
    assert err.value.response.headers["retry-after"] == "1"
    assert err.value.body["code"] == "rate_limit_exceeded"
    with pytest.raises(anthropic.RateLimitError) as err:
        claude.messages.create(model="claude-fake@status=429", max_tokens=5, messages=USER_HI)
    assert err.value.response.headers["retry-after"] == "1"
    assert err.value.body["error"]["type"] == "rate_limit_error"


def test_fail_first_counts_per_key(oai):
    """fail_first=2 fails the first two requests of an x-fake-key, then succeeds."""
    key = {"x-fake-key": str(uuid.uuid4()), "x-fake-scenario": "fail_first=2"}
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            oai.chat.completions.create(model="fake-model", messages=USER_HI, extra_headers=key)
    assert oai.chat.completions.create(
        model="fake-model", messages=USER_HI, extra_headers=key
    ).choices


def test_reset_after_cuts_the_stream(oai):
    """reset_after=3 drops the connection after three deltas and no terminator."""
    received = []
    stream = oai.chat.completions.create(
        model="fake-model@chunks=10,reset_after=3", messages=USER_HI, stream=True
    )
    with stream, pytest.raises(openai.APIConnectionError):
        received.extend(c.choices[0].delta.content for c in stream)
    assert "".join(received) == "chunk 0 chunk 1 chunk 2"


def test_malformed_after_emits_garbage(upstream):
    """malformed_after=1 puts one non-JSON data: line after the first delta."""
    response = httpx.post(
        f"{upstream}/v1/chat/completions",
        headers={"authorization": "Bearer k", "x-fake-scenario": "chunks=2,malformed_after=1"},
        json={"model": "fake-model", "messages": USER_HI, "stream": True},
    )
    lines = [line for line in response.text.split("\n\n") if line]
    assert lines[2] == 'data: {"id": not json at all'
    assert '"chunk 0"' in lines[1] and '" chunk 1"' in lines[3]
    assert lines[-1] == "data: [DONE]"


def test_no_usage_omits_usage_everywhere(oai, claude):
    """no_usage=1 drops usage from OpenAI, Responses and Anthropic replies, streamed or not."""
    assert (
        oai.chat.completions.create(model="fake-model@no_usage=1", messages=USER_HI).usage is None
    )
    with oai.chat.completions.create(
        model="fake-model@no_usage=1",
        messages=USER_HI,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    assert all(c.choices and c.usage is None for c in chunks)
    with oai.responses.create(model="fake-model@no_usage=1", input="hi", stream=True) as stream:
        completed = [e for e in stream if e.type == "response.completed"]
    assert completed[0].response.usage is None
    with claude.messages.create(
        model="claude-fake@no_usage=1", max_tokens=5, messages=USER_HI, stream=True
    ) as s:
        events = list(s)
    assert getattr(events[0].message, "usage", None) is None
    assert [getattr(e, "usage", None) for e in events if e.type == "message_delta"] == [None]


def test_scenario_header_overrides_model_suffix(oai, upstream):
    """The x-fake-scenario header beats the model suffix; the suffix is not echoed back."""
    reply = oai.chat.completions.create(
        model="fake-model@chunks=2", messages=USER_HI, extra_headers={"x-fake-scenario": "chunks=3"}
    )
    assert (reply.model, reply.choices[0].message.content) == (
        "fake-model",
        "chunk 0 chunk 1 chunk 2",
    )
    bad = httpx.post(
        f"{upstream}/v1/chat/completions",
        headers={"authorization": "Bearer k"},
        json={"model": "fake-model@chunkz=3", "messages": USER_HI},
    )
    assert bad.status_code == 400 and "chunkz" in bad.json()["error"]["message"]


def test_credentials_required_and_recorded(upstream, oai):
    """Requests without a key get a provider-shaped 401; last_request records what was sent."""
    missing = httpx.post(
        f"{upstream}/v1/messages", json={"model": "claude-fake", "messages": USER_HI}
    )
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"
    assert (
        httpx.post(f"{upstream}/v1/chat/completions", json={}).json()["error"]["code"]
        == "invalid_api_key"
    )

    oai.chat.completions.create(
        model="fake-model",
        messages=USER_HI,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Custom": "yes"},
    ).close()
    last = httpx.get(f"{upstream}/_fake/last_request").json()
    assert (last["method"], last["path"]) == ("POST", "/v1/chat/completions")
    assert (last["credential_header"], last["credential"]) == ("authorization", "sk-test")
    assert last["headers"]["x-custom"] == "yes"
    assert last["body"]["stream_options"] == {"include_usage": True}


def test_max_in_flight_counts_concurrent_streams(oai, upstream):
    """Ten parallel slow streams show up as max_in_flight 10, and in_flight drains to 0."""
    reset(upstream)

    # Each stream lasts 2 s, so the ten overlap even when a busy machine starts the threads late.
    def consume(_):
        with oai.chat.completions.create(
            model="fake-model@chunks=5,delay_ms=400", messages=USER_HI, stream=True
        ) as stream:
            return "".join(c.choices[0].delta.content or "" for c in stream)

    with ThreadPoolExecutor(10) as pool:
        assert list(pool.map(consume, range(10))) == [WORDS5] * 10
    wait_for(lambda: stats(upstream)["in_flight"] == 0)
    current = stats(upstream)
    assert current["max_in_flight"] == 10
    assert current["requests"] == current["by_path"]["/v1/chat/completions"] == 10


def test_client_closing_early_is_counted(oai, upstream):
    """A client that drops a stream half way bumps closed_early within 2 s."""
    reset(upstream)
    with oai.chat.completions.create(
        model="fake-model@chunks=100,delay_ms=20", messages=USER_HI, stream=True
    ) as stream:
        next(stream)
        next(stream)
    wait_for(lambda: stats(upstream)["closed_early"] == 1)
    current = stats(upstream)
    assert current["last_closed_early_at"] <= time.time()
    wait_for(lambda: stats(upstream)["in_flight"] == 0)


def test_hang_and_drip_timeouts(upstream):
    """hang_before_ms trips a first-byte timeout; drip_ms keeps an idle-read timeout from firing."""
    headers = {"authorization": "Bearer k"}
    url = f"{upstream}/v1/chat/completions"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            url, headers=headers, json={"model": "fake-model@hang_before_ms=600"}, timeout=0.2
        )

    body = {"model": "fake-model@drip_ms=50", "messages": USER_HI, "stream": True}
    started = time.monotonic()
    with httpx.stream(
        "POST", url, headers=headers, json=body, timeout=httpx.Timeout(5, read=0.3)
    ) as response:
        for frame in response.iter_raw():
            assert frame.startswith(b": keepalive")
            if time.monotonic() - started > 0.8:
                break

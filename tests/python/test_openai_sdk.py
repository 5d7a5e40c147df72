"""The agent through the official `openai` Python SDK, as a real client would use it."""

from __future__ import annotations

import json
from typing import Any, Iterator

import openai
import pytest

from conftest import FAKE_MODEL, Agent, FakeUpstream, http_client

TEXT = "The meeting moves to Thursday at noon."
CHINESE = "明天上午10点开会"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city"],
        },
    },
}
WEATHER_ARGS = {"city": "北京", "unit": "c"}


def sdk(agent: Agent, api_key: str | None = None, **kwargs: Any) -> openai.OpenAI:
    key = api_key if api_key is not None else (agent.api_key or "unused-no-auth")
    return openai.OpenAI(
        base_url=agent.base_url,
        api_key=key,
        max_retries=0,
        timeout=10.0,
        http_client=http_client(),
        **kwargs,
    )


@pytest.fixture
def client(agent: Agent) -> Iterator[openai.OpenAI]:
    c = sdk(agent)
    yield c
    c.close()


def ask(content: str = "When is the meeting?") -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def collect(stream: Any) -> tuple[str, list[Any]]:
    chunks = list(stream)
    text = "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].delta
    )
    return text, chunks


# --- plain completions ---------------------------------------------------------------------


def test_non_stream_content_usage_and_turn_id(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.script(text=TEXT, prompt_tokens=11)
    raw = client.chat.completions.with_raw_response.create(model=FAKE_MODEL, messages=ask())
    assert raw.status_code == 200
    turn_id = raw.headers.get("x-kotaemon-turn-id")
    assert turn_id, f"no x-kotaemon-turn-id header in {dict(raw.headers)}"

    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == TEXT
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 11
    assert completion.usage.completion_tokens == len(TEXT.split())
    assert completion.usage.total_tokens == 11 + len(TEXT.split())

    # Every turn gets its own id.
    fake.script(text=TEXT)
    again = client.chat.completions.with_raw_response.create(model=FAKE_MODEL, messages=ask())
    assert again.headers.get("x-kotaemon-turn-id") not in (None, "", turn_id)


def test_stream_deltas_concatenate_to_text_without_usage(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    fake.script(text=TEXT)
    raw = client.chat.completions.with_raw_response.create(
        model=FAKE_MODEL, messages=ask(), stream=True
    )
    assert raw.headers.get("x-kotaemon-turn-id")
    assert raw.headers.get("content-type", "").startswith("text/event-stream")
    text, chunks = collect(raw.parse())
    assert text == TEXT
    # Word-by-word upstream stream is relayed chunk by chunk, not merged.
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == len(TEXT.split())
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"]
    # The client did not ask for usage: no chunk carries it (even though the agent asks upstream).
    assert [c for c in chunks if c.usage is not None] == []
    assert all(c.choices for c in chunks), "a usage-only chunk leaked to the client"


def test_stream_include_usage_final_chunk_has_usage(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    fake.script(text=TEXT, prompt_tokens=9)
    stream = client.chat.completions.create(
        model=FAKE_MODEL,
        messages=ask(),
        stream=True,
        stream_options={"include_usage": True},
    )
    text, chunks = collect(stream)
    assert text == TEXT
    last = chunks[-1]
    assert last.usage is not None, f"final chunk has no usage: {last}"
    assert last.choices == []
    assert last.usage.prompt_tokens == 9
    assert last.usage.completion_tokens == len(TEXT.split())
    assert last.usage.total_tokens == 9 + len(TEXT.split())
    assert [c for c in chunks[:-1] if c.usage is not None] == []


def test_chinese_round_trips_non_stream(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.script(text=CHINESE)
    completion = client.chat.completions.create(model=FAKE_MODEL, messages=ask("开会时间？"))
    assert completion.choices[0].message.content == CHINESE
    assert fake.last_request()["body"]["messages"] == ask("开会时间？")

    # Request side too: the fake echoes the user's message back.
    question = "请提醒我：明天上午10点开会，地点在三楼。"
    fake.script(echo=True)
    completion = client.chat.completions.create(model=FAKE_MODEL, messages=ask(question))
    assert completion.choices[0].message.content == question


def test_chinese_round_trips_stream(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.script(text=CHINESE)
    text, chunks = collect(
        client.chat.completions.create(model=FAKE_MODEL, messages=ask("开会时间？"), stream=True)
    )
    assert text == CHINESE
    # The fake streams CJK one character per chunk: each arrives whole, never split mid-char.
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= len("明天上午")

    question = "请提醒我：明天上午10点开会，地点在三楼。"
    fake.script(echo=True)
    text, _ = collect(
        client.chat.completions.create(model=FAKE_MODEL, messages=ask(question), stream=True)
    )
    assert text == question


# --- tool calls and pass-through -------------------------------------------------------------


def test_tool_calls_non_stream_and_passthrough(client: openai.OpenAI, fake: FakeUpstream) -> None:
    args = json.dumps(WEATHER_ARGS, ensure_ascii=False)
    fake.script(tool_calls=[{"name": "get_weather", "arguments": args}])
    messages = ask("北京天气怎么样？")
    completion = client.chat.completions.create(
        model=FAKE_MODEL,
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        extra_body={"vendor_x": {"a": 1}, "seed": 7},
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.id
    assert call.function.name == "get_weather"
    assert call.function.arguments == args
    assert json.loads(call.function.arguments) == WEATHER_ARGS

    body = fake.last_request()["body"]
    assert body["tools"] == [WEATHER_TOOL]
    assert body["tool_choice"] == "auto"
    assert body["vendor_x"] == {"a": 1}
    assert body["seed"] == 7
    assert body["messages"] == messages
    assert body["model"] == FAKE_MODEL


def test_tool_calls_stream_assembled_and_passthrough(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    args = json.dumps(WEATHER_ARGS, ensure_ascii=False)
    other = json.dumps({"tz": "Asia/Shanghai"})
    fake.script(
        tool_calls=[
            {"name": "get_weather", "arguments": args},
            {"name": "get_time", "arguments": other},
        ]
    )
    stream = client.chat.completions.create(
        model=FAKE_MODEL,
        messages=ask("北京天气和时间？"),
        tools=[WEATHER_TOOL],
        stream=True,
        extra_body={"vendor_x": {"a": 1}, "seed": 7},
    )
    calls: dict[int, dict[str, str]] = {}
    finish_reasons = []
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.finish_reason:
            finish_reasons.append(choice.finish_reason)
        for tc in choice.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            if tc.id:
                entry["id"] = tc.id
            if tc.function is not None:
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
    assert finish_reasons == ["tool_calls"]
    assert sorted(calls) == [0, 1]
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == WEATHER_ARGS
    assert calls[1]["name"] == "get_time"
    assert calls[1]["arguments"] == other
    assert calls[0]["id"] and calls[1]["id"] and calls[0]["id"] != calls[1]["id"]

    body = fake.last_request()["body"]
    assert body["stream"] is True
    assert body["tools"] == [WEATHER_TOOL]
    assert body["vendor_x"] == {"a": 1}
    assert body["seed"] == 7


# --- errors ----------------------------------------------------------------------------------


def test_api_key_required(keyed_stack: tuple[FakeUpstream, Agent]) -> None:
    fake, agent = keyed_stack
    assert agent.api_key

    # Wrong key.
    with sdk(agent, api_key="sk-wrong") as bad:
        with pytest.raises(openai.AuthenticationError) as exc:
            bad.chat.completions.create(model=FAKE_MODEL, messages=ask())
        assert exc.value.status_code == 401
        assert exc.value.type == "authentication_error"
        assert exc.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model=FAKE_MODEL, messages=ask(), stream=True)

    # No Authorization header at all (the SDK refuses an empty key, so omit the header).
    no_auth = {"Authorization": openai.Omit()}
    with sdk(agent, api_key="x") as anon:
        with pytest.raises(openai.AuthenticationError) as exc:
            anon.chat.completions.create(model=FAKE_MODEL, messages=ask(), extra_headers=no_auth)
        assert exc.value.status_code == 401
        assert "authorization" not in {k.lower() for k in exc.value.request.headers}
    assert fake.requests() == [], "an unauthenticated request reached the upstream"

    # The right key works, and the agent does not forward the client's key upstream.
    with sdk(agent) as good:
        fake.script(text=TEXT)
        assert good.chat.completions.create(
            model=FAKE_MODEL, messages=ask()
        ).choices[0].message.content == TEXT
        assert FAKE_MODEL in [m.id for m in good.models.list()]
    upstream_auth = fake.last_request()["headers"].get("authorization", "")
    assert agent.api_key not in upstream_auth

    # /metrics is protected too; health endpoints are not.
    with http_client(base_url=agent.root) as raw:
        assert raw.get("/metrics").status_code == 401
        assert raw.get("/healthz").status_code == 200
        assert raw.get("/readyz").status_code == 200
    assert agent.http.get("/metrics").status_code == 200


def test_upstream_429_maps_to_rate_limit_error(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.default(status=429, retry_after_s=1)
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model=FAKE_MODEL, messages=ask())
    err = exc.value
    assert err.status_code == 429
    assert err.type == "rate_limit_error"
    retry_after = err.response.headers.get("retry-after")
    assert retry_after is not None and int(retry_after) >= 1
    assert err.response.headers.get("x-kotaemon-turn-id")
    assert fake.requests(), "the upstream was never called"


def test_upstream_500_maps_to_server_error(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.default(status=500)
    with pytest.raises(openai.InternalServerError) as exc:
        client.chat.completions.create(model=FAKE_MODEL, messages=ask())
    assert exc.value.status_code == 502
    assert exc.value.type == "server_error"
    assert isinstance(exc.value.body, dict) and exc.value.body.get("message")

    # Same for a stream that fails before anything was sent: a plain HTTP error, not SSE.
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model=FAKE_MODEL, messages=ask(), stream=True)
    assert exc.value.status_code in (502, 503)


def test_stream_reset_mid_answer_raises(client: openai.OpenAI, fake: FakeUpstream) -> None:
    words = "one two three four five six"
    # Every attempt fails the same way, so a retry cannot hide the fault.
    fault = {"text": words, "fault": {"kind": "reset_after_chunks", "chunks": 2}}
    fake.default(**fault)
    stream = client.chat.completions.create(model=FAKE_MODEL, messages=ask(), stream=True)
    received = []
    with pytest.raises(openai.APIError) as exc:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert "".join(received) == "one two"
    assert not isinstance(exc.value, openai.APIConnectionError), (
        "the stream broke at the transport level instead of ending with an SSE error event"
    )
    assert isinstance(exc.value.body, dict) and exc.value.body.get("message")


def test_stream_reset_ends_with_error_event_not_done(agent: Agent, fake: FakeUpstream) -> None:
    """The same fault seen on the wire: the last event is an error body, and no [DONE]."""
    fake.default(text="one two three four", fault={"kind": "reset_after_chunks", "chunks": 2})
    body = {"model": FAKE_MODEL, "messages": ask(), "stream": True}
    with agent.http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events, "empty stream"
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert set(last) == {"error"}
    assert set(last["error"]) >= {"message", "type", "param", "code"}
    assert last["error"]["type"] == "server_error"


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert FAKE_MODEL in ids


def test_sdk_against_dead_upstream_is_an_api_error(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    fake.default(fault={"kind": "reset_before_headers"})
    with pytest.raises(openai.APIStatusError) as exc:
        client.chat.completions.create(model=FAKE_MODEL, messages=ask())
    # A fresh agent: 3 attempts stay under the breaker's threshold, so this is the upstream
    # failure itself (502), not "no upstream available" (503).
    assert exc.value.status_code == 502
    assert exc.value.type == "server_error"

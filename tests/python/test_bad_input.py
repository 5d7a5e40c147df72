"""Malformed and hostile requests, sent with raw httpx. One agent serves the whole module, so the
last checks also prove that nothing before them hurt it."""

from __future__ import annotations

import json
import re
import select
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from conftest import FAKE_MODEL, Agent, FakeUpstream, http_client, running_stack

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]
TEN_MB = 10 * 1024 * 1024


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeUpstream, Agent]]:
    with running_stack(Path(tmp_path_factory.mktemp("bad-input"))) as s:
        yield s


@pytest.fixture
def agent(module_stack: tuple[FakeUpstream, Agent]) -> Iterator[Agent]:
    a = module_stack[1]
    yield a
    a.assert_alive()


@pytest.fixture
def fake(module_stack: tuple[FakeUpstream, Agent]) -> FakeUpstream:
    return module_stack[0]


def post_raw(agent: Agent, content: bytes, **kwargs: Any) -> httpx.Response:
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return agent.http.post(CHAT, content=content, headers=headers, **kwargs)


def post_json(agent: Agent, body: Any, **kwargs: Any) -> httpx.Response:
    return post_raw(agent, json.dumps(body).encode(), **kwargs)


def openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    """Asserts an OpenAI error body with this status and returns its `error` object."""
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text}"
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    return err


# --- JSON and schema -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b'{"model": "fake-model", "messages": [',
        b"",
        b"{not json}",
        b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]} trailing',
        b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}{"a": 1}',
    ],
    ids=["truncated", "empty", "garbage", "trailing-bytes", "two-documents"],
)
def test_invalid_json_is_400_invalid_json(agent: Agent, fake: FakeUpstream, content: bytes) -> None:
    before = len(fake.requests())
    err = openai_error(post_raw(agent, content), 400)
    assert len(fake.requests()) == before, "a body that is not one JSON document was served"
    assert err["code"] == "invalid_json"
    assert err["type"] == "invalid_request_error"
    assert err["param"] is None


def test_invalid_utf8_is_400(agent: Agent) -> None:
    content = b'{"model": "fake-model", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    err = openai_error(post_raw(agent, content), 400)
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": 5, "messages": MESSAGES}, "model"),
        ({"model": FAKE_MODEL, "messages": "hi"}, "messages"),
        ({"model": FAKE_MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": FAKE_MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": FAKE_MODEL, "messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"model": FAKE_MODEL, "messages": MESSAGES, "tools": "x"}, "tools"),
        ({"model": FAKE_MODEL, "messages": MESSAGES, "tools": [1]}, "tools[0]"),
        (
            {"model": FAKE_MODEL, "messages": MESSAGES, "stream": True, "stream_options": 3},
            "stream_options",
        ),
    ],
    ids=[
        "model-int",
        "messages-string",
        "role-unknown",
        "content-int",
        "stream-string",
        "tools-string",
        "tools-item-int",
        "stream-options-int",
    ],
)
def test_wrong_types_are_400_with_param(agent: Agent, fake: FakeUpstream, body: Any, param: str) -> None:
    before = len(fake.requests())
    err = openai_error(post_json(agent, body), 400)
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "invalid_request"
    assert err["param"] == param, err
    assert len(fake.requests()) == before, "an invalid request reached the upstream"


@pytest.mark.parametrize(
    "body",
    [[], None],
    ids=["array", "null"],
)
def test_non_object_body_is_400_without_bogus_param(agent: Agent, body: Any) -> None:
    err = openai_error(post_json(agent, body), 400)
    assert err["type"] == "invalid_request_error"
    # `param` names a request field, or is null: there is no field to blame here.
    assert err["param"] is None, err


def test_missing_model_names_the_field(agent: Agent) -> None:
    err = openai_error(post_json(agent, {"messages": MESSAGES}), 400)
    assert "model" in err["message"]
    assert err["param"] == "model", err


def test_empty_messages_is_400(agent: Agent, fake: FakeUpstream) -> None:
    before = len(fake.requests())
    err = openai_error(post_json(agent, {"model": FAKE_MODEL, "messages": []}), 400)
    assert err["type"] == "invalid_request_error"
    assert "messages" in err["message"]
    assert len(fake.requests()) == before


def test_valid_request_still_served(agent: Agent, fake: FakeUpstream) -> None:
    """Control: the same agent answers a well-formed request between all the bad ones."""
    fake.script(text="still fine")
    r = post_json(agent, {"model": FAKE_MODEL, "messages": MESSAGES})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "still fine"


# --- size limit ------------------------------------------------------------------------------


def big_body() -> bytes:
    head = json.dumps({"model": FAKE_MODEL, "messages": [{"role": "user", "content": ""}]})
    # Valid JSON, only too large: the limit, not the parser, must refuse it.
    return head.replace('"content": ""', '"content": "' + "x" * TEN_MB + '"').encode()


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]  # lowercased names
    body: bytes
    sent: int  # body bytes written before the server answered or closed


def raw_post_oversized(agent: Agent, body: bytes) -> RawAnswer:
    """POST over a plain socket that stops sending as soon as the server answers (or closes),
    so a server that answers 413 and closes before reading everything is still understood."""
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
        s.sendall(
            (
                f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
        )
        view = memoryview(body)
        sent = 0
        while sent < len(body):
            readable, writable, _ = select.select([s], [s], [], 10)
            if readable:
                break
            if not writable:
                raise TimeoutError("the agent neither read the body nor answered for 10 s")
            try:
                sent += s.send(view[sent : sent + 256 * 1024])
            except (BrokenPipeError, ConnectionResetError):
                break
        data = b""
        try:
            while True:
                head, sep, rest = data.partition(b"\r\n\r\n")
                if sep:
                    m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                    if m and len(rest) >= int(m.group(1)):
                        break
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep and head.startswith(b"HTTP/1.1 "), f"no HTTP answer to an oversized body: {data[:200]!r}"
    lines = head.decode(errors="replace").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawAnswer(status=int(lines[0].split(" ")[1]), headers=headers, body=rest, sent=sent)


def test_ten_mb_body_is_413(agent: Agent, fake: FakeUpstream) -> None:
    body = big_body()
    before = len(fake.requests())
    try:
        # A client of its own: the agent may close this connection after answering.
        with http_client(base_url=agent.root) as c:
            r = c.post(CHAT, content=body, headers={"content-type": "application/json"})
    except httpx.TransportError:
        # The agent answered and closed before httpx finished sending: read it the raw way.
        raw = raw_post_oversized(agent, body)
        assert raw.status == 413, raw
        err = json.loads(raw.body)["error"]
    else:
        err = openai_error(r, 413)
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "request_too_large"
    assert len(fake.requests()) == before
    agent.assert_alive()  # on the module's own pooled client: a fresh connection


def test_ten_mb_chunked_body_is_413(agent: Agent) -> None:
    """Same without Content-Length: the limit holds while reading a chunked stream."""

    def chunks() -> Iterator[bytes]:
        body = big_body()
        for i in range(0, len(body), 256 * 1024):
            yield body[i : i + 256 * 1024]

    try:
        with http_client(base_url=agent.root) as c:
            r = c.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    except httpx.TransportError as e:
        pytest.fail(f"agent dropped a chunked oversized upload without an answer: {e!r}")
    err = openai_error(r, 413)
    assert err["code"] == "request_too_large"
    agent.assert_alive()


def test_413_announces_connection_close(agent: Agent) -> None:
    """The agent answers 413 without reading the rest of the body, so it cannot keep the
    connection; it must say so (`Connection: close`), or pooled keep-alive clients (httpx, the
    openai SDK) send their next request into a closed socket and fail with "Server disconnected
    without sending a response"."""
    raw = raw_post_oversized(agent, big_body())
    assert raw.status == 413, raw
    assert raw.sent < TEN_MB, "the agent read the whole 10 MB body before refusing it"
    assert "close" in raw.headers.get("connection", "").lower(), (
        f"413 answered before the body was read (then the connection is closed) without "
        f"`Connection: close`: {raw.headers}"
    )


# --- routes and headers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/nope"), ("POST", "/v1/embeddings"), ("GET", "/"), ("POST", "/v1/chat/completion")],
)
def test_unknown_route_is_404_openai_body(agent: Agent, method: str, path: str) -> None:
    err = openai_error(agent.http.request(method, path), 404)
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "not_found"


def test_get_chat_completions_is_405(agent: Agent) -> None:
    r = agent.http.get(CHAT)
    err = openai_error(r, 405)
    assert err["code"] == "method_not_allowed"
    assert "POST" in r.headers.get("allow", ""), r.headers


def test_unknown_upstream_header_is_400(agent: Agent, fake: FakeUpstream) -> None:
    before = len(fake.requests())
    body = {"model": FAKE_MODEL, "messages": MESSAGES}
    err = openai_error(post_json(agent, body, headers={"x-kotaemon-upstream": "nope"}), 400)
    assert err["code"] == "unknown_upstream"
    assert err["type"] == "invalid_request_error"
    assert "nope" in err["message"]
    assert len(fake.requests()) == before

    # Streams are refused the same way, before any SSE starts.
    err = openai_error(
        post_json(agent, {**body, "stream": True}, headers={"x-kotaemon-upstream": "nope"}), 400
    )
    assert err["code"] == "unknown_upstream"

    # Control: the configured name is accepted.
    fake.script(text="pinned")
    r = post_json(agent, body, headers={"x-kotaemon-upstream": "fake"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "pinned"


def test_agent_survived_everything(module_stack: tuple[FakeUpstream, Agent]) -> None:
    fake, agent = module_stack
    agent.assert_alive()
    with http_client(base_url=agent.root) as c:
        assert c.get("/readyz").status_code == 200
    fake.script(text="alive")
    r = post_json(agent, {"model": FAKE_MODEL, "messages": MESSAGES})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "alive"

"""/metrics after real traffic is valid Prometheus exposition, checked by `promtool`."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import FAKE_MODEL, Agent, FakeUpstream

PROMTOOL_TIMEOUT_S = 10


def promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail("promtool is not on PATH but CI is set: install it (Debian package `prometheus`)")
    pytest.skip("promtool is not on PATH (install Debian package `prometheus`); CI does not skip this")


def make_traffic(agent: Agent, fake: FakeUpstream) -> None:
    body = {"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hello there"}]}
    fake.script(text="non stream answer", prompt_tokens=5)
    r = agent.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text

    fake.script(text="a streamed answer", prompt_tokens=6)
    with agent.http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"

    fake.default(status=500)  # every attempt of this turn fails
    r = agent.http.post("/v1/chat/completions", json=body)
    assert r.status_code == 502, r.text
    fake.default()

    r = agent.http.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400, r.text
    assert agent.http.get("/v1/models").status_code == 200


def test_metrics_pass_promtool_check(agent: Agent, fake: FakeUpstream) -> None:
    tool = promtool()
    make_traffic(agent, fake)

    r = agent.http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text

    for family in (
        "kotaemon_http_requests_total",
        "kotaemon_turn_duration_seconds_bucket",
        "kotaemon_tokens_total",
        "kotaemon_breaker_state",
    ):
        assert any(line.startswith(family) for line in text.splitlines()), (
            f"{family} missing from /metrics:\n{text}"
        )

    proc = subprocess.run(
        [tool, "check", "metrics"],
        input=r.content,
        capture_output=True,
        timeout=PROMTOOL_TIMEOUT_S,
    )
    out = proc.stdout.decode(errors="replace").strip()
    err = proc.stderr.decode(errors="replace").strip()
    assert proc.returncode == 0, f"promtool check metrics exited {proc.returncode}:\n{err}\n{out}"
    assert err == "", f"promtool reported problems:\n{err}"
    assert out == "", f"promtool reported problems:\n{out}"


def test_metrics_count_the_traffic(agent: Agent, fake: FakeUpstream) -> None:
    """The counters move with what was actually served, not just exist."""
    make_traffic(agent, fake)
    text = agent.http.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)

    def total(prefix: str, *needles: str) -> float:
        return sum(
            v for k, v in samples.items() if k.startswith(prefix) and all(n in k for n in needles)
        )

    chat = "kotaemon_http_requests_total"
    assert total(chat, '"/v1/chat/completions"', '"200"') == 2, text
    assert total(chat, '"/v1/chat/completions"', '"502"') == 1, text
    assert total(chat, '"/v1/chat/completions"', '"400"') == 1, text
    # Scripted prompt tokens 5 + 6; answers of 3 words each (the fake counts one token a word).
    assert total("kotaemon_tokens_total", 'direction="in"') == 11, text
    assert total("kotaemon_tokens_total", 'direction="out"') == 6, text

"""Fixtures for the end-to-end tests: a real `kotaemon fake-upstream` process and a real
`kotaemon serve` process pointed at it, on free loopback ports, torn down after each test.

The binary comes from env `KOTAEMON_BIN` (default: `<repo>/target/release/kotaemon`).
Every HTTP call made here has a timeout; every wait is a bounded poll.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
HTTP_TIMEOUT = httpx.Timeout(10.0)
STARTUP_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
API_KEY_ENV = "KOTAEMON_TEST_KEY"
FAKE_MODEL = "fake-model"


def kotaemon_bin() -> Path:
    path = Path(os.environ.get("KOTAEMON_BIN") or REPO / "target" / "release" / "kotaemon")
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(
            f"kotaemon binary not found at {path}: run `cargo build --release` or set KOTAEMON_BIN",
            pytrace=False,
        )
    return path


def http_client(**kwargs: Any) -> httpx.Client:
    """An httpx client that ignores proxy variables of the environment (loopback only)."""
    kwargs.setdefault("timeout", HTTP_TIMEOUT)
    return httpx.Client(trust_env=False, **kwargs)


_SESSION_DATA_DIR = tempfile.mkdtemp(prefix="kotaemon-pytest-")
atexit.register(shutil.rmtree, _SESSION_DATA_DIR, True)
_DEFAULT_MODELS_DIR = (
    Path(os.environ["KOTAEMON_DATA_DIR"]) / "models"
    if os.environ.get("KOTAEMON_DATA_DIR")
    else Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "kotaemon" / "models"
)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child process: ours without any KOTAEMON_* variable (those are
    config overrides for the agent), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KOTAEMON_")}
    env.setdefault("RUST_BACKTRACE", "1")
    # Audit log and cache go to a directory of this test session, not the user's; installed
    # models are still found where `kotaemon models install` put them.
    env["KOTAEMON_DATA_DIR"] = _SESSION_DATA_DIR
    env["KOTAEMON_MODELS_DIR"] = os.environ.get("KOTAEMON_MODELS_DIR") or str(_DEFAULT_MODELS_DIR)
    env.update(extra or {})
    return env


def _die_with_parent() -> None:
    """Children get SIGTERM if this test process dies, so no agent outlives a crashed run."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "<no log>"
    return "\n".join(text.splitlines()[-lines:])


def stop_process(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


class FakeUpstream:
    """A `kotaemon fake-upstream` child process and its control endpoints."""

    def __init__(self, workdir: Path):
        self.out = workdir / "fake-upstream.stdout"
        self.log = workdir / "fake-upstream.stderr"
        with open(self.out, "wb") as out, open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [str(kotaemon_bin()), "fake-upstream", "--listen", "127.0.0.1:0"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=child_env(),
                preexec_fn=_die_with_parent,
            )
        try:
            self.base_url = self._wait_listening()
            self.root = self.base_url.removesuffix("/v1")
            self.http = http_client(base_url=self.root)
        except BaseException:
            stop_process(self.proc)
            raise

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            first = self.out.read_text(errors="replace").split("\n", 1)
            if len(first) == 2:
                m = re.fullmatch(r"listening on (http://127\.0\.0\.1:\d+/v1)", first[0].strip())
                if not m:
                    raise RuntimeError(f"unexpected first line from fake upstream: {first[0]!r}")
                return m.group(1)
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"fake upstream exited with {self.proc.returncode}:\n{tail(self.log)}"
                )
            time.sleep(0.02)
        raise RuntimeError(f"fake upstream did not start in {STARTUP_TIMEOUT_S}s:\n{tail(self.log)}")

    def _post(self, path: str, body: Any) -> None:
        r = self.http.post(path, json=body)
        assert r.status_code == 200, f"fake {path} refused {body!r}: {r.status_code} {r.text}"

    def script(self, **script: Any) -> None:
        """Queues a script for the next chat request (FIFO)."""
        self._post("/_fake/script", script)

    def default(self, **script: Any) -> None:
        """Script used whenever the queue is empty."""
        self._post("/_fake/default", script)

    def reset(self) -> None:
        self._post("/_fake/reset", {})

    def requests(self) -> list[dict[str, Any]]:
        r = self.http.get("/_fake/requests")
        assert r.status_code == 200, r.text
        return r.json()

    def last_request(self) -> dict[str, Any]:
        reqs = self.requests()
        assert reqs, "the fake upstream received no chat request"
        return reqs[-1]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.http.close()
        stop_process(self.proc)


class Agent:
    """A `kotaemon serve` child process."""

    def __init__(self, workdir: Path, upstream_url: str, api_key: str | None = None):
        self.workdir = workdir
        self.api_key = api_key
        self.config = workdir / "agent.toml"
        self.log = workdir / "agent.log"
        self.proc: subprocess.Popen | None = None
        last_error = ""
        # A port picked by free_port() can be taken before the agent binds it: retry a few times.
        for _ in range(3):
            self.port = free_port()
            self._write_config(upstream_url)
            env = child_env({API_KEY_ENV: api_key} if api_key is not None else None)
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    [str(kotaemon_bin()), "serve", "--config", str(self.config)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    preexec_fn=_die_with_parent,
                )
            try:
                if self._wait_ready():
                    break
            except BaseException:
                stop_process(self.proc)
                raise
            last_error = tail(self.log)
            stop_process(self.proc)
        else:
            raise RuntimeError(f"agent could not bind a port after 3 tries:\n{last_error}")
        self.root = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.root}/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
        self.http = http_client(base_url=self.root, headers=headers)

    def _write_config(self, upstream_url: str) -> None:
        keys = f'api_keys = ["env:{API_KEY_ENV}"]\n' if self.api_key is not None else ""
        self.config.write_text(
            "[server]\n"
            f'listen = "127.0.0.1:{self.port}"\n'
            f"{keys}"
            "\n[pool.health]\n"
            "interval_ms = 500\n"
            "\n[[upstreams]]\n"
            'name = "fake"\n'
            f'base_url = "{upstream_url}"\n'
        )

    def _wait_ready(self) -> bool:
        """True once /readyz answers 200; False if the agent could not bind its port."""
        assert self.proc is not None
        url = f"http://127.0.0.1:{self.port}/readyz"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        last = "no answer"
        with http_client(timeout=httpx.Timeout(1.0)) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    log = tail(self.log)
                    if "cannot listen" in log:
                        return False
                    raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{log}")
                try:
                    r = c.get(url)
                    if r.status_code == 200:
                        return True
                    last = f"{r.status_code} {r.text}"
                except httpx.TransportError as e:
                    last = repr(e)
                time.sleep(0.05)
        raise RuntimeError(
            f"agent not ready within {STARTUP_TIMEOUT_S}s (last /readyz: {last}):\n{tail(self.log)}"
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def assert_alive(self) -> None:
        assert self.alive(), (
            f"agent process died (exit {self.proc.returncode if self.proc else None}):\n"
            f"{tail(self.log)}"
        )
        r = self.http.get("/healthz")
        assert r.status_code == 200, f"/healthz answered {r.status_code}: {r.text}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.http.close()
        if self.proc is not None:
            stop_process(self.proc)


@contextlib.contextmanager
def running_stack(workdir: Path, api_key: str | None = None) -> Iterator[tuple[FakeUpstream, Agent]]:
    """Starts a fake upstream and an agent in front of it; stops both on the way out, and then
    fails if the agent had died during the test or logged a panic."""
    workdir.mkdir(parents=True, exist_ok=True)
    fake = FakeUpstream(workdir)
    agent = None
    try:
        agent = Agent(workdir, fake.base_url, api_key=api_key)
        yield fake, agent
        died = not agent.alive()
        code = agent.proc.returncode if agent.proc else None
    finally:
        if agent is not None:
            agent.close()
        fake.close()
    assert not died, f"agent exited during the test with {code}:\n{tail(agent.log)}"
    log = agent.log.read_text(errors="replace")
    assert "panicked" not in log, f"agent panicked:\n{tail(agent.log, 80)}"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[FakeUpstream, Agent]]:
    with running_stack(tmp_path) as s:
        yield s


@pytest.fixture
def fake(stack: tuple[FakeUpstream, Agent]) -> FakeUpstream:
    return stack[0]


@pytest.fixture
def agent(stack: tuple[FakeUpstream, Agent]) -> Agent:
    return stack[1]


@pytest.fixture
def keyed_stack(tmp_path: Path) -> Iterator[tuple[FakeUpstream, Agent]]:
    """Like `stack`, with `server.api_keys = ["env:KOTAEMON_TEST_KEY"]`; the key is a fresh
    random value set in the agent's environment only (`agent.api_key`)."""
    with running_stack(tmp_path, api_key="sk-test-" + secrets.token_hex(16)) as s:
        yield s

"""Shared by the server tests: `kogpt-fast serve` started as a user starts it (a subprocess on 127.0.0.1 and a free
port, `--port 0`, as the README says), the openai client on it, and /metrics read back as numbers."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

API_KEY = "test-key-123"
DEMO_NAME = "kogpt-fast-demo"
STARTUP_TIMEOUT_S = 120


class ServerProcess:
    """`python -m kogpt_fast serve --port 0 ARGS...` (a free port, which its first line names), its output in a log
    file; stop() sends SIGTERM."""

    def __init__(self, log_dir: Path, *args: str, env: dict | None = None):
        self.log_path = log_dir / f"server-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        environment = {**os.environ, "OPENBLAS_NUM_THREADS": "1", **(env or {})}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kogpt_fast", "serve", "--port", "0", *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=environment,
        )
        self.pid = self.process.pid
        self.port = self.url = None

    def wait_ready(self) -> "ServerProcess":
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            if self.port is None:
                found = re.search(r"serving .* at http://127\.0\.0\.1:(\d+)/v1", self.log())
                if found:
                    self.port = int(found.group(1))
                    self.url = f"http://127.0.0.1:{self.port}"
            if self.port is not None:
                try:
                    if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not answer /health within {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60) -> int:
        self.terminate()
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the server did not exit within {timeout} s of SIGTERM:\n{self.log()}")
        finally:
            self._log.close()

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def openai_client(url: str, api_key: str = API_KEY, **kwargs):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs)


def async_openai_client(url: str, api_key: str = API_KEY, **kwargs):
    import openai

    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs)


METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metrics(url: str) -> dict[str, float]:
    """/metrics as {'name{labels}': value} (labels as Prometheus prints them)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match:
            values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


def wait_for(predicate, timeout: float = 30, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("timed out waiting")

"""`kogpt-fast serve` starting and stopping: SIGTERM drains what runs and exits 0; past the grace period it aborts and
still exits 0; a full queue is a 429 with Retry-After; a checkpoint with a chat template gets chat completions; and
without the serve extra the command says how to install it, while the package and the other commands never need it."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from server_helpers import DEMO_NAME, ServerProcess, metrics, openai_client, wait_for
from kogpt_fast import demo_model_path

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def open_stream(port: int, body: dict) -> socket.socket:
    """A raw streaming request whose first event has arrived: the request is running."""
    data = json.dumps({**body, "stream": True}).encode()
    connection = socket.create_connection(("127.0.0.1", port), timeout=60)
    connection.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    wait_for(lambda: b"data: " in connection.recv(65536))
    return connection


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except OSError:
        return True


def test_sigterm_stops_accepting_finishes_what_runs_and_exits_0(tmp_path):
    server = ServerProcess(tmp_path, "--grace-period", "120").wait_ready()
    client = openai_client(server.url, api_key="unused")
    started = [threading.Event() for _ in range(3)]

    def run(i):
        chunks = []
        for chunk in client.completions.create(model=DEMO_NAME, prompt=f"국회는 {i}", max_tokens=120, temperature=0,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"min_tokens": 120}):
            chunks.append(chunk)
            started[i].set()
        return chunks

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(run, i) for i in range(3)]
        for event in started:
            assert event.wait(60), server.log()
        server.terminate()
        wait_for(lambda: refused(server.port), timeout=10)  # no new connections while it drains
        results = [f.result(timeout=120) for f in futures]
    for chunks in results:
        assert chunks[-1].usage.completion_tokens == 120 and chunks[-2].choices[0].finish_reason == "length"
    assert server.stop(timeout=60) == 0, server.log()


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """The demo checkpoint with a chat template in its tokenizer_config.json."""
    path = tmp_path_factory.mktemp("chat") / "demo-chat"
    shutil.copytree(demo_model_path(), path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return path


def test_chat_template_queue_full_and_a_grace_period_that_runs_out(tmp_path, chat_checkpoint):
    server = ServerProcess(tmp_path, "--model", str(chat_checkpoint), "--served-model-name", "demo-chat",
                           "--max-running", "1", "--max-queue", "1", "--grace-period", "1").wait_ready()
    client = openai_client(server.url, api_key="unused")

    # Chat completions through the template: the same text as the completion of the rendered prompt.
    messages = [{"role": "system", "content": "헌법"}, {"role": "user", "content": "국회는"}]
    chat = client.chat.completions.create(model="demo-chat", messages=messages, max_tokens=12, temperature=0)
    prompt = "system: 헌법\nuser: 국회는\nassistant:"
    plain = client.completions.create(model="demo-chat", prompt=prompt, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].text and chat.choices[0].message.role == "assistant"
    assert chat.usage == plain.usage and chat.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="demo-chat", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, logprobs=True, top_logprobs=2))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].text
    assert all(len(e.top_logprobs) == 2 for c in chunks for e in (c.choices[0].logprobs.content or []))

    # One running, one waiting: the next is a 429 with Retry-After, which the client raises as RateLimitError.
    running = open_stream(server.port, {"model": "demo-chat", "prompt": "국회는", "max_tokens": 480,
                                        "min_tokens": 480})
    waiting = client.completions.create(model="demo-chat", prompt="대통령은", max_tokens=4, stream=True)
    wait_for(lambda: metrics(server.url)["kogpt_requests_waiting"] == 1)
    with pytest.raises(openai.RateLimitError) as raised:
        client.completions.create(model="demo-chat", prompt="국회는", max_tokens=4)
    assert raised.value.status_code == 429 and raised.value.response.headers["retry-after"] == "1"
    assert raised.value.body["code"] == "queue_full"

    # SIGTERM with a request 480 tokens long and a grace period of 1 s: both requests end with an error event
    # (shutting_down), and the server exits 0.
    start = time.monotonic()
    server.terminate()
    rest = b""
    while chunk := running.recv(65536):
        rest += chunk
    running.close()
    assert b'"code":"shutting_down"' in rest and b"data: [DONE]" in rest
    with pytest.raises(openai.APIError, match="shut down before the request finished"):
        list(waiting)
    assert server.stop(timeout=60) == 0, server.log()
    assert time.monotonic() - start < 30
    assert "Traceback" not in server.log()


def test_serve_without_the_extra_says_how_to_install_it():
    code = ("import sys; sys.modules['fastapi'] = None; from kogpt_fast.cli import main; "
            "sys.exit(main(['serve']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "pip install 'kogpt-fast[serve]'" in result.stderr and "fastapi" in result.stderr


def test_the_package_and_the_other_commands_never_import_the_server():
    code = ("import sys, kogpt_fast, kogpt_fast.serving, kogpt_fast.cli; kogpt_fast.cli.build_parser(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'prometheus_client', 'starlette', 'pydantic') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_serve_flags_are_checked_before_anything_loads():
    for argv, message in ((["--port", "-1"], "--port"), (["--max-running", "0"], "--max-running"),
                          (["--bogus"], "unrecognized")):
        result = subprocess.run([sys.executable, "-m", "kogpt_fast", "serve", *argv], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    result = subprocess.run([sys.executable, "-m", "kogpt_fast", "serve", "--model", "/nonexistent"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:  # a port in use: said before the model loads
        port = str(taken.getsockname()[1])
        result = subprocess.run([sys.executable, "-m", "kogpt_fast", "serve", "--port", port], capture_output=True,
                                text=True, timeout=120)
    assert result.returncode == 1 and f"error: cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr

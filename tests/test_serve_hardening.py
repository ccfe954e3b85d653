"""`ft serve` under ordinary OpenAI code and hostile clients: a real server subprocess (embedded SmolLM2,
an API key, a 2 s header timeout) driven by the official `openai` client and raw sockets.

* disconnects stop the work (non-streaming, and while the prompt is read);
* 200 idle sockets block neither /health nor an authenticated chat, and are closed after the timeout;
* control characters in a path leave one well-formed log line;
* OpenAI strictness: nulls, BadRequestError with `param`, models.retrieve, logprobs, tiny temperature,
  legacy functions refused, bad tool conversations refused with the reason;
* base and tuned alternating from 4 threads share one copy of the base: no 503.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from serve_helpers import BASE, RUN_ID, add_tuned_run, make_workspace, start_server

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.e2e

KEY = "hardening-key-0123456789abcdefghij"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEADER_TIMEOUT = 2.0
PREFILL_CHUNK = 64
NO_EOS = {"0": -100, "2": -100}  # SmolLM2's <|endoftext|> and <|im_end|>: generation runs to max_tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_dir):
    tmp = tmp_path_factory.mktemp("serve-hardening")
    ws = make_workspace(tmp / "ws", smollm2_dir, passwords={"serve_api_key": KEY})
    add_tuned_run(ws)
    srv = start_server(
        ws,
        tmp,
        "--model",
        BASE,
        "--header-timeout",
        str(HEADER_TIMEOUT),
        "--prefill-chunk",
        str(PREFILL_CHUNK),
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=120)


def _addr(server) -> tuple[str, int]:
    u = urlparse(server.url)
    return u.hostname, u.port


def _raw(server, head: str, body: bytes = b"") -> socket.socket:
    s = socket.create_connection(_addr(server), timeout=30)
    s.sendall(head.encode("latin-1") + body)
    return s


def _post_raw(server, path: str, payload: dict) -> socket.socket:
    body = json.dumps(payload).encode()
    host, port = _addr(server)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return _raw(server, head, body)


def _queued(server) -> int:
    return httpx.get(server.url + "/health", timeout=10).json()["queued"]


def _wait(cond, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.05)
    return time.monotonic() - t0


def test_disconnect_stops_a_non_streaming_generation(server, client):
    before = server.log().count("generation stopped (cancelled)")
    s = _post_raw(
        server,
        "/v1/completions",
        {"model": BASE, "prompt": "Once upon a time", "max_tokens": 3000, "logit_bias": NO_EOS},
    )
    _wait(lambda: _queued(server) == 1, 30, "the request never started")
    time.sleep(1.0)  # generating
    s.close()
    freed = _wait(lambda: _queued(server) == 0, 10, "the generation went on after the client left")
    _wait(lambda: server.log().count("generation stopped (cancelled)") > before, 5, "no cancellation logged")
    t0 = time.monotonic()
    r = client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
    )
    took = time.monotonic() - t0
    assert r.choices[0].message.content is not None
    print(f"worker freed {freed:.2f}s after the disconnect; next short request answered in {took:.2f}s")
    assert took < 3.0


def test_disconnect_while_the_prompt_is_read_stops_it(server):
    before = server.log().count("generation stopped (cancelled) after 0 tokens")
    long_prompt = "one two three four five six seven eight " * 250  # ~2,000 tokens: 32 chunks of 64
    s = _post_raw(server, "/v1/completions", {"model": BASE, "prompt": long_prompt, "max_tokens": 5})
    _wait(lambda: _queued(server) == 1, 30, "the request never started")
    time.sleep(0.5)
    s.close()
    freed = _wait(lambda: _queued(server) == 0, 20, "the prompt was read to the end after the client left")
    print(f"prompt processing stopped {freed:.2f}s after the disconnect")
    _wait(
        lambda: server.log().count("generation stopped (cancelled) after 0 tokens") > before,
        5,
        "no cancellation during prompt processing logged",
    )


def test_idle_sockets_block_neither_health_nor_chats_and_are_closed(server, client):
    host, port = _addr(server)
    idle = []
    for i in range(200):
        s = socket.create_connection((host, port), timeout=30)
        if i % 2:  # half send part of a request head and stop (slow loris)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        idle.append(s)
    t0 = time.monotonic()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    r = client.chat.completions.create(
        model=BASE, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
    )
    assert r.choices[0].message.content is not None
    print(f"/health and a chat answered in {time.monotonic() - t0:.2f}s with 200 idle sockets open")
    time.sleep(HEADER_TIMEOUT + 1.5)
    closed = 0
    for s in idle:
        s.settimeout(5)
        try:
            closed += s.recv(1) == b""
        except (ConnectionResetError, TimeoutError):
            closed += isinstance(s, socket.socket)
        s.close()
    assert closed == 200


def _access_lines(server, marker: str) -> list[str]:
    return [line for line in server.log().splitlines() if marker in line]


def test_control_characters_in_a_path_leave_one_well_formed_log_line(server):
    host, port = _addr(server)
    for auth in ("", f"Authorization: Bearer {KEY}\r\n"):
        marker = f"probe{len(auth)}"
        s = _raw(
            server,
            f"GET /v1/{marker}%0aFAKE%20200%0d%00%1b[31mred HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}"
            "Connection: close\r\n\r\n",
        )
        reply = s.recv(65536)
        s.close()
        assert reply.startswith(b"HTTP/1.1 40")
        time.sleep(0.3)
        log = server.log()
        assert "\x1b" not in log and "\x00" not in log and "\r" not in log
        assert not any(line.startswith("FAKE") for line in log.splitlines())
        if auth:  # with the key: the escaped path is logged on one line
            lines = _access_lines(server, marker)
            assert len(lines) == 1 and "\\x0aFAKE 200\\x0d\\x00\\x1b[31mred" in lines[0], lines
        else:  # without: one fixed-shape line that holds nothing the client sent
            assert not _access_lines(server, marker)
            assert "refused (no valid API key) 401" in log


def test_explicit_nulls_are_the_defaults(server):
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": "Hi"}],
        **dict.fromkeys(
            (
                "temperature",
                "top_p",
                "n",
                "stream",
                "presence_penalty",
                "frequency_penalty",
                "logprobs",
                "top_logprobs",
                "stop",
                "seed",
                "logit_bias",
                "user",
                "stream_options",
                "response_format",
                "tools",
                "tool_choice",
                "functions",
                "function_call",
                "max_completion_tokens",
            )
        ),
        "max_tokens": 3,
    }
    r = httpx.post(server.v1 + "/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    # null max_tokens on a completion is OpenAI's 16, not "the whole context"
    r = httpx.post(
        server.v1 + "/completions",
        json={"model": BASE, "prompt": "Once upon a time", "max_tokens": None, "logit_bias": NO_EOS},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert (
        r.json()["usage"]["completion_tokens"] == 16 and r.json()["choices"][0]["finish_reason"] == "length"
    )


def test_bad_fields_are_bad_request_errors_naming_the_param(client):
    msgs = [{"role": "user", "content": "Hi"}]
    cases = [
        ({"temperature": 5}, "temperature"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"extra_body": {"n": 2}}, "n"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=BASE, messages=msgs, max_tokens=2, **kwargs)
        assert e.value.param == param, (kwargs, e.value.body)
        assert e.value.body["type"] == "invalid_request_error"
    # a tool result that answers no call: refused with the reason, never silently dropped
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=BASE,
            messages=[*msgs, {"role": "tool", "tool_call_id": "c1", "content": "42"}],
            max_tokens=2,
        )
    assert e.value.param == "messages" and "tool result" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=BASE, messages=[{"role": "wizard", "content": "x"}])
    assert e.value.param == "messages.[0].role"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=BASE, prompt="x", logprobs=9)
    assert e.value.param == "logprobs"


def test_models_retrieve(client):
    m = client.models.retrieve(BASE)
    assert m.id == BASE and m.object == "model"
    assert client.models.retrieve(RUN_ID).model_extra["base"] == BASE
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_logprobs_and_tiny_temperature(client):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    greedy = client.chat.completions.create(
        model=BASE, messages=msgs, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
    )
    content = greedy.choices[0].logprobs.content
    assert len(content) == greedy.usage.completion_tokens
    assert "".join(t.token for t in content) == greedy.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    tiny = client.chat.completions.create(model=BASE, messages=msgs, max_tokens=8, temperature=1e-9)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content
    assert greedy.choices[0].logprobs is not None
    plain = client.chat.completions.create(model=BASE, messages=msgs, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    comp = client.completions.create(model=BASE, prompt="The capital of France is", max_tokens=4, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == comp.usage.completion_tokens
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    stream = client.chat.completions.create(
        model=BASE, messages=msgs, max_tokens=8, temperature=0, logprobs=True, stream=True
    )
    streamed = [
        t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_base_and_tuned_alternating_from_4_threads_never_get_503(server):
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        c = openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=120)
        for k in range(5):
            model = BASE if (i + k) % 2 else RUN_ID
            try:
                r = c.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
                )
                outcome = "ok" if r.model == model else f"wrong model {r.model}"
            except openai.APIStatusError as e:
                outcome = f"{e.status_code}"
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert outcomes == ["ok"] * 20, outcomes
    log = server.log()
    assert log.count(f"loaded {BASE}") == 1 and "unloaded" not in log


def test_aborted_stream_is_logged_with_its_tokens(server, client):
    stream = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=2000,
        logit_bias={0: -100, 2: -100},
        stream=True,
    )
    got = 0
    for c in stream:
        got += bool(c.choices and c.choices[0].delta.content)
        if got >= 5:
            break
    stream.close()
    _wait(lambda: "stream aborted by the client after" in server.log(), 10, "no abort logged")
    _wait(lambda: _queued(server) == 0, 10, "the aborted stream kept generating")
    assert "finish=aborted" in server.log()

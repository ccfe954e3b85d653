"""`ft serve` end to end: a real server subprocess with the embedded SmolLM2 and an API key, driven by
the official `openai` client.

* output: compared token for token with mlx-lm's own greedy generation (base model and tuned run);
* safety: every route but /health needs the key, 500 malformed requests get 4xx and never a 500,
  16 concurrent clients complete or get 429, an exposed host without a key refuses to start.

One server for the whole module (starting it and loading the model is the slow part).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time

import httpx
import pytest

from serve_helpers import (
    BASE,
    CHECKPOINT,
    RUN_ID,
    RUN_NAME,
    add_tuned_run,
    ft_env,
    make_workspace,
    start_server,
)

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write one sentence about a cat."}]
MAX_TOKENS = 24
KEY = "test-key-0123456789abcdefghijklmnop"
MAX_QUEUE = 4
CHAT = {
    "model": BASE,
    "messages": [{"role": "user", "content": "Say hi."}],
    "max_tokens": 4,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_dir):
    """(server, references): the server, and mlx-lm's greedy outputs computed in this process."""
    from mlx_lm import generate

    from ft.models.loading import load_model_dir

    tmp = tmp_path_factory.mktemp("serve-e2e")
    ws = make_workspace(tmp / "ws", smollm2_dir, passwords={"serve_api_key": KEY})
    tuned_model, tok = add_tuned_run(ws)
    # Start the server first: it loads its model while this process computes the references.
    server = start_server(
        ws, tmp, "--model", BASE, "--max-tokens", "64", "--max-queue", str(MAX_QUEUE), wait_ready=False
    )
    try:
        base = load_model_dir(ws / "models" / BASE)

        def greedy(model, messages=None, prompt=None, n=MAX_TOKENS):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True) if messages else prompt
            return generate(model, tok, prompt=ids, max_tokens=n)

        refs = {
            "question": greedy(base.model, QUESTION),
            "story": greedy(base.model, STORY),
            "tuned_question": greedy(tuned_model, QUESTION),
            "completion": greedy(base.model, prompt="The capital of France is", n=8),
        }
        del base, tuned_model
        server_ready = start_ready(server)
        yield server_ready, refs
    finally:
        server.stop()


def start_ready(server, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        assert server.proc.poll() is None, server.log()
        time.sleep(0.2)
    raise AssertionError("server not ready:\n" + server.log())


@pytest.fixture(scope="module")
def client(served):
    server, _ = served
    return openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=120)


def test_lists_base_models_and_tuned_runs(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, RUN_ID, RUN_NAME}  # the run by id, and by its name
    assert models[BASE].model_extra["kind"] == "base"
    for name in (RUN_ID, RUN_NAME):
        extra = models[name].model_extra
        assert extra["kind"] == "tuned" and extra["run"] == RUN_ID
        assert extra["base"] == BASE and extra["checkpoint"] == CHECKPOINT


def test_chat_equals_mlx_lm_greedy(client, served):
    _, refs = served
    r = client.chat.completions.create(model=BASE, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)
    assert r.choices[0].message.content == refs["question"]
    assert "Paris" in refs["question"]  # the reference itself is a real answer
    assert r.choices[0].message.role == "assistant" and r.model == BASE
    assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_equals_mlx_lm_greedy(client, served):
    _, refs = served
    stream = client.chat.completions.create(
        model=BASE,
        messages=STORY,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == refs["story"]
    assert len([p for p in pieces if p]) > 3  # really streamed, not one blob
    assert finish in ("stop", "length") and usage is not None and usage.completion_tokens > 0


def test_completion_equals_mlx_lm_greedy(client, served):
    _, refs = served
    r = client.completions.create(model=BASE, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text == refs["completion"]
    assert r.choices[0].finish_reason in ("stop", "length")


def test_stop_sequences_cut_the_text(client, served):
    _, refs = served
    full = refs["question"]
    cut = full.index("Paris")
    r = client.chat.completions.create(
        model=BASE, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS, stop=["Paris", "zzz"]
    )
    assert r.choices[0].message.content == full[:cut]
    assert r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=BASE, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS, stop=["Paris"], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == full[:cut]


def test_tuned_run_by_name_differs_from_base_and_equals_mlx_lm(client, served):
    server, refs = served
    assert refs["tuned_question"] != refs["question"]
    r = client.chat.completions.create(model=RUN_ID, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)
    assert r.model == RUN_ID
    assert r.choices[0].message.content == refs["tuned_question"]
    by_name = client.chat.completions.create(
        model=RUN_NAME, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS
    )
    assert by_name.model == RUN_NAME and by_name.choices[0].message.content == refs["tuned_question"]
    stream = client.chat.completions.create(
        model=RUN_NAME, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == refs["tuned_question"]
    # and back: the base model still gives its own answer
    r = client.chat.completions.create(model=BASE, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)
    assert r.choices[0].message.content == refs["question"]
    log = server.log()
    # base and tuned share one copy of the base weights (--max-models 1): the run's adapters were
    # attached to the loaded base, nothing was reloaded or unloaded
    assert f"attached {RUN_ID} to {BASE}" in log
    assert log.count(f"loaded {BASE}") == 1 and "unloaded" not in log


def test_unknown_and_path_like_models_are_refused(client):
    for name in ("../../etc/passwd", "/etc/passwd", f"{RUN_ID}:../../x", "models/" + BASE, "gpt-4"):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=name, messages=QUESTION, max_tokens=2)


def test_sampling_with_seed_repeats(client):
    kw = dict(model=BASE, messages=STORY, temperature=0.9, top_p=0.95, max_tokens=12, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b and a


def test_abandoned_stream_frees_the_worker_and_log_has_no_prompts(served):
    server, _ = served
    body = {"model": BASE, "messages": STORY, "max_tokens": 64, "temperature": 0.8, "stream": True}
    with httpx.stream(
        "POST",
        server.v1 + "/chat/completions",
        json=body,
        timeout=60,
        headers={"Authorization": f"Bearer {KEY}"},
    ) as r:
        for i, _line in enumerate(r.iter_lines()):
            if i > 4:
                break  # hang up mid-generation
    deadline = time.monotonic() + 60
    while "generation stopped (cancelled)" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    log = server.log()
    assert "generation stopped (cancelled)" in log
    assert "tok/s=" in log and "prompt_tokens=" in log
    assert "capital of France" not in log and "about a cat" not in log  # prompts are not logged by default


# -- safety ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(served):
    return served[0]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _routes() -> list[tuple[str, str]]:
    """(method, path) of every route the application defines (built without loading anything)."""
    from ft.server.app import create_app
    from ft.server.config import ServerConfig

    class NoModels:
        def models(self):
            return []

        def load(self, info):
            raise AssertionError("not used")

    app = create_app(ServerConfig(), NoModels()).fastapi
    found = []
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                found.append((method, route.path))
    return found


def test_every_route_but_health_needs_the_key(server, http):
    routes = _routes()
    assert {p for _, p in routes} >= {"/health", "/v1/models", "/v1/chat/completions", "/v1/completions"}
    bad_headers = [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": KEY},
        {"X-Api-Key": KEY},
    ]
    checked = 0
    for method, path in [
        *routes,
        ("GET", "/nope"),
        ("DELETE", "/v1/models"),
        ("GET", "/docs"),
        ("GET", "/health/"),
    ]:
        for headers in bad_headers:
            r = http.request(method, path, headers=headers, json=CHAT if method == "POST" else None)
            if path == "/health":
                assert r.status_code == 200, (method, path)
                assert "loaded" not in r.json()  # public: says nothing about the models
            else:
                assert r.status_code == 401, (method, path, headers, r.status_code)
                assert r.headers.get("www-authenticate") == "Bearer"
                checked += 1
    assert checked >= 7 * 7
    good = {"Authorization": f"Bearer {KEY}"}
    assert http.get("/v1/models", headers=good).status_code == 200
    assert (
        http.post(
            "/v1/chat/completions", headers={**good, "authorization": f"bearer {KEY}"}, json=CHAT
        ).status_code
        == 200
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.v1, api_key="wrong", max_retries=0).models.list()
    assert BASE in [
        m.id for m in openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0).models.list().data
    ]
    assert KEY not in server.log()


PATHLIKE = [
    "../../etc/passwd",
    "/etc/passwd",
    "..",
    ".",
    "~/.ssh/id_rsa",
    "models/../../x",
    "C:\\Windows\\win.ini",
    "%2e%2e%2fetc%2fpasswd",
    "file:///etc/passwd",
    "smollm2\x00",
    f"{BASE}/../{BASE}",
    f"../{BASE}",
    "https://huggingface.co/x/y",
    "runs/x/checkpoints/best",
    " " + BASE,
    "",
]
WRONG = [
    None,
    -1,
    0,
    -1e9,
    10**30,
    1e308,
    "x",
    "",
    [],
    {},
    [1],
    {"a": 1},
    True,
    "\ud800",
    float("nan"),
    float("inf"),
]


def _fuzz_cases(rng: random.Random, n: int) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(method, path, body, headers) of ``n`` requests that are each wrong in at least one way."""
    json_h = {"content-type": "application/json"}
    cases: list[tuple[str, str, bytes, dict[str, str]]] = []
    paths = ["/v1/chat/completions", "/v1/completions"]

    def dump(obj) -> bytes:
        return json.dumps(obj, allow_nan=True).encode("utf-8", "surrogatepass")

    invalid_fields = {
        "/v1/chat/completions": [
            ("messages", v)
            for v in [
                None,
                [],
                "hi",
                [{}],
                [{"role": "user"}, 3],
                [{"role": "robot", "content": "x"}],
                [{"role": "user", "content": 5}],
                [{"role": "user", "content": [{"type": "image_url"}]}],
                [{"role": "user", "content": "\ud800"}],
            ]
        ]
        + [
            ("n", 2),
            ("n", 0),
            ("temperature", -0.1),
            ("temperature", 2.5),
            ("top_p", 1.5),
            ("max_tokens", 0),
            ("max_tokens", -5),
            ("stop", [""]),
            ("stop", ["x"] * 40),
            ("seed", -1),
            ("seed", 2**70),
            ("top_logprobs", 3),  # without logprobs: true
            ("top_logprobs", 50),
            ("logprobs", "yes"),
            ("functions", [{"name": "f", "parameters": {}}]),
            ("tools", [{"type": "function", "function": {"name": "f"}}]),
            ("logit_bias", {"x": 1}),
            ("logit_bias", {"5": 1000}),
            ("logit_bias", {"99999999": 1}),
            ("stream_options", "yes"),
            ("presence_penalty", 9),
            ("response_format", {"type": "json_object"}),
        ]
        + [("model", m) for m in PATHLIKE]
        + [
            (f, v)
            for f in ("temperature", "top_p", "max_tokens", "n", "seed")
            for v in (
                "x",
                [],
                {},
                "y",
                float("nan"),
                float("inf"),
            )
        ],
        "/v1/completions": [
            ("prompt", v)
            for v in [None, 5, ["a", "b"], [], [-1], [10**12], [[1, 2]], {"a": 1}, "\ud800", [99999999]]
        ]
        + [("echo", True), ("suffix", "s"), ("best_of", 3), ("max_tokens", 0), ("n", 3), ("logprobs", 9)]
        + [("model", m) for m in PATHLIKE],
    }
    while len(cases) < n:
        kind = rng.random()
        path = rng.choice(paths)
        if kind < 0.12:  # not JSON at all
            body = rng.choice(
                [
                    b"{",
                    b"{'a': 1}",
                    b"nul",
                    b'{"messages": [}',
                    bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))),
                    b'{"model": "x",}',
                    b"\xff\xfe\x00",
                ]
            )
            cases.append(("POST", path, body, json_h))
        elif kind < 0.2:  # JSON, but not an object
            cases.append(("POST", path, dump(rng.choice([[], [CHAT], 1, "s", None, True, 1.5])), json_h))
        elif kind < 0.24:  # deeply nested
            depth = rng.choice([1000, 100_000])
            cases.append(("POST", path, b"[" * depth + b"]" * depth, json_h))
        elif kind < 0.27:  # too big
            cases.append(("POST", path, b'{"prompt": "' + b"a" * (1 << 20) + b'"}', json_h))
        elif kind < 0.3:  # wrong method or content type
            if rng.random() < 0.5:
                cases.append(("GET", path, b"", {}))
            else:
                cases.append(
                    ("POST", path, b"model=x&prompt=y", {"content-type": "application/x-www-form-urlencoded"})
                )
        else:  # a valid body with one or more wrong fields, plus random noise (huge max_tokens, extra keys)
            body = (
                dict(CHAT)
                if path.endswith("chat/completions")
                else {"model": BASE, "prompt": "Hi", "max_tokens": 4}
            )
            for field, value in rng.sample(invalid_fields[path], rng.randint(1, 3)):
                body[field] = value
            if rng.random() < 0.4:
                body["max_tokens" if "max_tokens" not in body or rng.random() < 0.5 else "extra"] = (
                    rng.choice([10**6, 10**18, 2**63])
                )
                # keep it wrong: huge max_tokens alone would be a valid (clamped) request
                if not any(f in body and body[f] == v for f, v in invalid_fields[path]):
                    body["n"] = 5
            if rng.random() < 0.3:
                body[rng.choice(["foo", "__class__", "../x"])] = rng.choice(WRONG)
            if rng.random() < 0.2:
                body.pop("messages" if "messages" in body else "prompt")  # required: its absence is an error
            cases.append(("POST", path, dump(body), json_h))
    return cases[:n]


def test_500_malformed_requests_get_4xx_and_the_server_stays_healthy(server, http):
    auth = {"Authorization": f"Bearer {KEY}"}
    cases = _fuzz_cases(random.Random(1234), 500)
    statuses: dict[int, int] = {}
    failures = []
    for method, path, body, headers in cases:
        r = http.request(method, path, content=body or None, headers={**auth, **headers})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        if not 400 <= r.status_code < 500:
            failures.append((r.status_code, method, path, body[:200], r.text[:200]))
        elif r.headers.get("content-type", "").startswith("application/json"):
            err = r.json()["error"]
            assert err["message"] and err["type"]
    assert not failures, failures[:5]
    assert sum(statuses.values()) == 500 and 500 not in statuses
    assert {400, 404, 413} <= set(statuses), statuses  # every kind of refusal was exercised
    assert 422 not in statuses  # validation errors are 400 invalid_request_error, as OpenAI answers
    # the server is alive and still answers correctly
    assert http.get("/health").status_code == 200
    r = http.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert "Traceback" not in server.log() and "unhandled error" not in server.log()


def test_16_concurrent_clients_complete_or_get_429(server):
    results: list[str] = []
    barrier = threading.Barrier(16)
    lock = threading.Lock()

    def one(i: int) -> None:
        client = openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=0, timeout=120)
        barrier.wait()
        try:
            r = client.chat.completions.create(
                model=BASE,
                messages=[{"role": "user", "content": f"Count to {i}."}],
                max_tokens=6,
                temperature=0,
            )
            outcome = "ok" if r.choices[0].message.content is not None else "empty"
        except openai.RateLimitError:
            outcome = "429"
        except Exception as e:  # anything else is a failure of the test
            outcome = f"{type(e).__name__}: {e}"
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 16
    others = [r for r in results if r not in ("ok", "429")]
    assert not others, others
    assert results.count("ok") >= 1
    assert results.count("ok") <= 16
    print(
        f"16 concurrent: {results.count('ok')} completed, {results.count('429')} got 429 (queue {MAX_QUEUE})"
    )
    deadline = time.monotonic() + 30  # the worker counts a job done just after sending its last event
    while httpx.get(server.url + "/health").json()["queued"] != 0:
        assert time.monotonic() < deadline, "the queue did not drain"
        time.sleep(0.05)


def test_exposed_host_without_key_refuses_to_start(tmp_path, smollm2_dir, capsys):
    from ft.cli.app import run

    ws = make_workspace(tmp_path / "ws", smollm2_dir)
    # The real command, as a user types it...
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "ft", "--workspace", str(ws), "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        env=ft_env(),
        timeout=120,
    )
    assert p.returncode == 10, (p.stdout, p.stderr)
    assert "serve_api_key" in p.stderr and "listening" not in p.stdout and "Traceback" not in p.stderr
    assert time.monotonic() - t0 < 60  # refused before any model was loaded

    def refused(host: str) -> str:
        """The same entry point in-process (cheaper); it must return, not start serving."""
        done: list[int] = []
        t = threading.Thread(
            target=lambda: done.append(run(["--workspace", str(ws), "serve", "--host", host, "--port", "0"])),
            daemon=True,
        )
        t.start()
        t.join(60)
        assert done == [10], f"--host {host!r} was not refused"
        return capsys.readouterr().err

    for host in ("::", "", "192.0.2.1"):
        assert "serve_api_key" in refused(host)
    # a key too short to be safe is refused too
    (ws / "passwords.yml").write_text("serve_api_key: abc\n")
    (ws / "passwords.yml").chmod(0o600)
    assert "characters" in refused("0.0.0.0")

"""Serving, in-process: stop sequences, token budgets, validation, LRU swapping, 503 while loading, 413.

The app runs on a real (tiny, random-weight) 2-layer Llama with the embedded SmolLM2 tokenizer, so
these tests exercise the real generation path in seconds; the subprocess tests with the real model
are in test_serve_e2e.py and test_serve_security.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from ft.server.app import create_app
from ft.server.config import ServerConfig
from ft.server.errors import ApiError
from ft.server.generation import StopMatcher, token_budget
from ft.server.run import check_exposure
from ft.server.schemas import ChatCompletionRequest, CompletionRequest
from ft.server.security import is_loopback
from ft.server.source import LoadedModel, ModelInfo

CTX = 64


def _feed_all(stops: list[str], pieces: list[str]) -> tuple[str, bool, list[str]]:
    m = StopMatcher(stops)
    sent: list[str] = []
    for p in pieces:
        out, hit = m.feed(p)
        sent.append(out)
        if hit:
            return "".join(sent), True, sent
    sent.append(m.flush())
    return "".join(sent), False, sent


def test_stop_matcher_cuts_at_the_first_stop_across_pieces():
    text, hit, sent = _feed_all(["END", "\n\n"], ["Hello wor", "ld E", "N", "D and more"])
    assert (text, hit) == ("Hello world ", True)
    # "E" and "EN" were held back until it was clear they start "END"
    assert sent[1] == "ld " and sent[2] == ""


def test_stop_matcher_releases_a_false_alarm_and_flushes():
    text, hit, _ = _feed_all(["END"], ["an E", "ND"[:1] + "x", " tail E"])
    assert (text, hit) == ("an ENx tail E", False)
    assert _feed_all([], ["a", "b"])[0] == "ab"
    assert _feed_all(["x"], ["x"])[:2] == ("", True)


def _lm(ctx: int | None) -> LoadedModel:
    return LoadedModel(info=ModelInfo(id="m", kind="base"), model=None, tokenizer=None, context_length=ctx)


def test_token_budget_clamps_to_context_and_cap():
    assert token_budget(_lm(100), 90, 10**18, None) == 10
    assert token_budget(_lm(100), 90, 5, None) == 5
    assert token_budget(_lm(100), 10, None, 7) == 7
    assert token_budget(_lm(100), 10, None, None) == 90
    with pytest.raises(ApiError) as e:
        token_budget(_lm(100), 100, 1, None)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"


def test_request_validation_refuses_what_cannot_be_honoured():
    ok = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": "x"}
    )
    assert ok.stops() == ["x"] and ok.temperature == 1.0
    bad = [
        {"messages": []},
        {"messages": [{"role": "user", "content": "hi"}], "n": 2},
        {"messages": [{"role": "user", "content": "hi"}], "temperature": float("nan")},
        {"messages": [{"role": "user", "content": "hi"}], "temperature": 3},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": [{"role": "user", "content": "\ud800"}]},
        {"messages": [{"role": "user", "content": "hi"}], "stop": [""]},
        {"messages": [{"role": "user", "content": "hi"}], "seed": -1},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
        {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
        {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
        {"messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]},
        {
            "messages": [{"role": "user", "content": "hi"}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        },
        {"messages": [{"role": "function", "name": "f", "content": "1"}]},
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
        {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"abc": 1}},
    ]
    for body in bad:
        with pytest.raises(ValidationError):
            ChatCompletionRequest.model_validate(body)
    assert CompletionRequest.model_validate({"prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": ["a", "b"]})


def test_loopback_detection_and_exposure_rule():
    assert (
        is_loopback("127.0.0.1")
        and is_loopback("::1")
        and is_loopback("localhost")
        and is_loopback("127.0.0.2")
    )
    assert (
        not is_loopback("0.0.0.0")
        and not is_loopback("")
        and not is_loopback("192.168.1.5")
        and not is_loopback("::")
    )
    check_exposure(ServerConfig(host="127.0.0.1"))
    from ft.errors import FtError

    with pytest.raises(FtError) as e:
        check_exposure(ServerConfig(host="0.0.0.0"))
    assert "serve_api_key" in (e.value.hint or "")
    with pytest.raises(FtError):
        check_exposure(ServerConfig(host="0.0.0.0", api_key=SecretStr("short")))
    check_exposure(ServerConfig(host="0.0.0.0", api_key=SecretStr("x" * 32)))


# -- the app on tiny random models -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(Path(smollm2_dir))


class FakeSource:
    """Tiny random Llamas named a, b, c; `gate` holds loads back so a test can watch the server load."""

    def __init__(self, tokenizer, ids=("a", "b", "c")):
        self.tokenizer = tokenizer
        self.ids = ids
        self.gate = threading.Event()
        self.gate.set()
        self.loads: list[str] = []

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=i, kind="base", fingerprint=i) for i in self.ids]

    def load(self, info: ModelInfo) -> LoadedModel:
        import mlx.core as mx
        from mlx_lm.models import llama

        assert self.gate.wait(30)
        mx.random.seed(sum(map(ord, info.id)))
        args = llama.ModelArgs(
            model_type="llama",
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            vocab_size=self.tokenizer.vocab_size,
            tie_word_embeddings=True,
        )
        model = llama.Model(args)
        mx.eval(model.parameters())
        self.loads.append(info.id)
        return LoadedModel(info=info, model=model, tokenizer=self.tokenizer, context_length=CTX)


def _chat(client: TestClient, model: str, content: str = "hi", **kw):
    body = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0, **kw}
    return client.post("/v1/chat/completions", json=body)


def test_lru_swaps_models_and_serves_each(tokenizer):
    src = FakeSource(tokenizer)
    app = create_app(ServerConfig(max_models=2, max_tokens=4), src)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        texts = {}
        for name in ("a", "b", "a", "c", "a", "b"):
            r = _chat(client, name)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == name
            texts.setdefault(name, r.json()["choices"][0]["message"]["content"])
            assert r.json()["choices"][0]["message"]["content"] == texts[name]  # same model, same greedy text
        # capacity 2: a stays (recently used), c evicts b, then b evicts c
        assert src.loads == ["a", "b", "c", "b"]
        assert client.get("/health").json()["loaded"] == ["a", "b"]


def test_503_while_loading_then_ok(tokenizer):
    src = FakeSource(tokenizer)
    src.gate.clear()
    app = create_app(ServerConfig(default_model="a", max_tokens=2), src)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        h = client.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "loading"
        r = _chat(client, "a")
        assert (
            r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "model_loading"
        )
        assert client.get("/v1/models").status_code == 200  # listing does not need the model
        src.gate.set()
        for _ in range(200):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.05)
        assert _chat(client, "a").status_code == 200


def test_context_clamp_and_errors_that_need_the_model(tokenizer):
    app = create_app(ServerConfig(), FakeSource(tokenizer))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        long_prompt = " ".join(["word"] * 40)
        r = client.post(
            "/v1/completions",
            json={"model": "a", "prompt": long_prompt, "max_tokens": 10**15, "temperature": 0},
        )
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        assert u["prompt_tokens"] + u["completion_tokens"] <= CTX and r.json()["choices"][0][
            "finish_reason"
        ] in ("length", "stop")
        r = client.post("/v1/completions", json={"model": "a", "prompt": " ".join(["word"] * 100)})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        r = client.post("/v1/completions", json={"model": "a", "prompt": [10**9]})
        assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
        r = _chat(client, "a", logit_bias={"999999999": 5})
        assert r.status_code == 400
        r = client.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert r.status_code == 400
        r = client.post(
            "/v1/chat/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"}
        )
        assert r.status_code == 413
        assert client.get("/health").status_code == 200


def test_streaming_equals_non_streaming_and_seed_repeats(tokenizer):
    app = create_app(ServerConfig(max_tokens=12), FakeSource(tokenizer))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        first = _chat(client, "a", "tell me").json()
        whole = first["choices"][0]["message"]["content"]
        assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        again = _chat(client, "a", "tell me").json()  # same prompt: served from the prompt cache, same text
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
        assert again["choices"][0]["message"]["content"] == whole
        longer = _chat(client, "a", "tell me more").json()  # shares the template's prefix
        assert (
            0
            < longer["usage"]["prompt_tokens_details"]["cached_tokens"]
            < longer["usage"]["prompt_tokens"] - 1
        )
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "a",
                "messages": [{"role": "user", "content": "tell me"}],
                "temperature": 0,
                "stream": True,
            },
        ) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        import json

        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        sampled = [
            _chat(client, "a", "tell me", temperature=1.0, seed=7).json()["choices"][0]["message"]["content"]
            for _ in range(2)
        ]
        assert sampled[0] == sampled[1]


class _Blocking:
    """A model whose forward pass waits for `gate`: keeps the worker busy for as long as a test needs."""

    def __init__(self, model, gate: threading.Event):
        self._model, self._gate = model, gate

    def __call__(self, *args, **kwargs):
        assert self._gate.wait(30)
        return self._model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


class BlockingSource(FakeSource):
    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.busy = threading.Event()

    def load(self, info: ModelInfo) -> LoadedModel:
        lm = super().load(info)
        lm.model = _Blocking(lm.model, self.busy)
        return lm


def _wait_until(cond, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_full_queue_gets_429_and_the_admitted_ones_finish(tokenizer):
    src = BlockingSource(tokenizer)
    app = create_app(ServerConfig(max_queue=1, max_batch=1, max_tokens=3), src)
    scheduler = app.fastapi.state.ft.scheduler
    with TestClient(app, base_url="http://127.0.0.1") as client:
        src.busy.set()
        assert _chat(client, "a").status_code == 200  # loaded, and the path works
        src.busy.clear()
        results: dict[str, int] = {}
        threads = [
            threading.Thread(target=lambda n=n: results.__setitem__(n, _chat(client, "a", n).status_code))
            for n in "xy"
        ]
        threads[0].start()
        _wait_until(lambda: scheduler.pending == 1)
        threads[1].start()
        _wait_until(
            lambda: scheduler.pending == 2
        )  # one generating (blocked), one waiting: the queue is full
        r = _chat(client, "a", "z")
        assert (
            r.status_code == 429
            and r.json()["error"]["type"] == "rate_limit_error"
            and r.headers["retry-after"]
        )
        src.busy.set()
        for t in threads:
            t.join(60)
        assert results == {"x": 200, "y": 200}
        _wait_until(lambda: scheduler.pending == 0)  # the worker counts a job done just after its last event


def test_request_timeout_gives_504_and_stops_the_generation(tokenizer):
    src = BlockingSource(tokenizer)
    src.busy.set()
    app = create_app(ServerConfig(request_timeout=1.0, max_tokens=50, default_model="a"), src)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        _wait_until(lambda: client.get("/health").status_code == 200)
        src.busy.clear()
        t0 = time.monotonic()
        r = _chat(client, "a")
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert time.monotonic() - t0 < 10
        src.busy.set()
        _wait_until(lambda: app.fastapi.state.ft.scheduler.pending == 0)
        assert _chat(client, "a", max_tokens=2).status_code == 200


class _NoModels:
    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id="m", kind="base")]

    def load(self, info: ModelInfo) -> LoadedModel:
        raise AssertionError("not loaded in this test")


def test_cors_is_off_unless_configured():
    origin = {"Origin": "http://localhost:3000"}
    key = "k" * 32
    with TestClient(create_app(ServerConfig(api_key=SecretStr(key)), _NoModels())) as client:
        r = client.get("/v1/models", headers={**origin, "Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        pre = client.options(
            "/v1/chat/completions", headers={**origin, "Access-Control-Request-Method": "POST"}
        )
        assert pre.status_code == 401 and "access-control-allow-origin" not in pre.headers
    config = ServerConfig(api_key=SecretStr(key), cors_origins=("http://localhost:3000",))
    with TestClient(create_app(config, _NoModels())) as client:
        pre = client.options(
            "/v1/chat/completions",
            headers={
                **origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin["Origin"]
        r = client.get("/v1/models", headers={**origin, "Authorization": f"Bearer {key}"})
        assert r.headers["access-control-allow-origin"] == origin["Origin"]
        assert client.get("/v1/models", headers=origin).status_code == 401  # CORS does not replace the key
        other = client.get(
            "/v1/models", headers={"Origin": "http://evil.example", "Authorization": f"Bearer {key}"}
        )
        assert "access-control-allow-origin" not in other.headers


def test_prompts_are_logged_only_when_asked(tokenizer, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="ft.server")
    for opt_in in (False, True):
        caplog.clear()
        with TestClient(
            create_app(ServerConfig(max_tokens=2, log_prompts=opt_in), FakeSource(tokenizer)),
            base_url="http://127.0.0.1",
        ) as client:
            assert _chat(client, "a", "my secret question").status_code == 200
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert ("my secret question" in text) == opt_in
        assert "completion_tokens=" in text  # the access line is always there


def test_empty_key_is_no_key_and_without_a_key_only_local_host_names_are_answered():
    assert ServerConfig(api_key=SecretStr("")).api_key is None
    assert ServerConfig(api_key=SecretStr("  ")).api_key is None
    app = create_app(ServerConfig(api_key=SecretStr("")), _NoModels())
    for base, ok in [
        ("http://127.0.0.1:8000", True),
        ("http://localhost", True),
        ("http://[::1]:8000", True),
        ("http://app.localhost", True),
        ("http://evil.example", False),  # DNS rebinding: a foreign name pointed at 127.0.0.1
        ("http://10.0.0.5:8000", False),
    ]:
        with TestClient(app, base_url=base) as client:
            r = client.get("/v1/models")
            assert (r.status_code == 200) == ok, (base, r.status_code)
            if not ok:
                assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    key = "k" * 32
    with TestClient(
        create_app(ServerConfig(api_key=SecretStr(key)), _NoModels()), base_url="http://evil"
    ) as c:
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


class _ShareSource(FakeSource):
    """FakeSource whose tuned variant "a-tuned" is "a" with LoRA layers, sharing a's weights."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer, ids=("a",))
        self.adapted: list[str] = []

    def models(self) -> list[ModelInfo]:
        return super().models() + [
            ModelInfo(id="a-tuned", kind="tuned", base="a", run="r1", checkpoint="step-1", fingerprint="t")
        ]

    def adapt(self, base: LoadedModel, info: ModelInfo) -> LoadedModel:
        import mlx.core as mx
        from mlx.utils import tree_flatten

        from ft.engine.lora import AdapterSpec, apply_adapters
        from ft.models.loading import share_weights

        model = share_weights(base.model)
        apply_adapters(
            model, AdapterSpec(method="lora", rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
        )
        mx.random.seed(1)
        model.load_weights(
            [(k, mx.random.normal(v.shape)) for k, v in tree_flatten(model.parameters()) if "lora_b" in k],
            strict=False,
        )
        model.eval()
        self.adapted.append(info.id)
        return LoadedModel(
            info=info, model=model, tokenizer=base.tokenizer, context_length=base.context_length
        )


def test_base_and_tuned_share_one_base_and_are_batched_separately(tokenizer):
    from mlx.utils import tree_flatten

    src = _ShareSource(tokenizer)
    app = create_app(ServerConfig(max_models=1, max_tokens=6), src)
    pool = app.fastapi.state.ft.scheduler.pool
    with TestClient(app, base_url="http://127.0.0.1") as client:
        alone = {
            m: _chat(client, m, "hello").json()["choices"][0]["message"]["content"] for m in ("a", "a-tuned")
        }
        assert alone["a"] != alone["a-tuned"]
        results: list[tuple[str, int, str]] = []
        lock = threading.Lock()

        def worker(i: int) -> None:
            for k in range(4):
                m = "a" if (i + k) % 2 else "a-tuned"
                r = _chat(client, m, "hello")
                with lock:
                    results.append((m, r.status_code, r.json()["choices"][0]["message"]["content"]))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert len(results) == 16 and all(code == 200 for _, code, _ in results)
        assert all(
            text == alone[m] for m, _, text in results
        )  # each model its own greedy text, batched or not
        assert src.loads == ["a"] and src.adapted == ["a-tuned"]  # one load, one attach
        group = pool._groups["a"]
        base_w = dict(tree_flatten(group.base.model.parameters()))
        tuned_w = dict(tree_flatten(group.variants["run:r1:step-1"].model.parameters()))
        assert tuned_w["model.embed_tokens.weight"] is base_w["model.embed_tokens.weight"]  # not a copy


def test_concurrent_requests_are_decoded_together_with_their_own_settings(tokenizer):
    app = create_app(ServerConfig(max_tokens=8, max_batch=8), FakeSource(tokenizer))
    scheduler = app.fastapi.state.ft.scheduler
    with TestClient(app, base_url="http://127.0.0.1") as client:
        prompts = [f"topic {i}" for i in range(6)]
        alone = {p: _chat(client, "a", p).json()["choices"][0]["message"]["content"] for p in prompts}
        assert scheduler.largest_batch == 1
        out: dict[str, str] = {}
        lock = threading.Lock()

        def one(kind: str, body: dict) -> None:
            r = _chat(client, "a", **body)
            with lock:
                out[kind] = r.json()["choices"][0]["message"]["content"]

        jobs = [(p, {"content": p}) for p in prompts]
        jobs += [("sampled", {"content": "x", "temperature": 1.0, "top_p": 0.9, "seed": 3})]
        jobs += [
            ("short", {"content": "topic 0", "max_tokens": 2}),
            ("stop", {"content": "topic 1", "stop": alone["topic 1"][3:6]}),
        ]
        threads = [threading.Thread(target=one, args=j) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert scheduler.largest_batch > 1  # they were decoded together
        assert all(out[p] == alone[p] for p in prompts)  # greedy: the same text as alone
        assert out["sampled"]  # (a seed repeats alone: see above; in a batch the random tiny model's
        # near-uniform logits differ in the last bits, so exact samples are not compared here)
        assert alone["topic 0"].startswith(out["short"]) and len(out["short"]) < len(alone["topic 0"])
        assert out["stop"] == alone["topic 1"][: alone["topic 1"].index(alone["topic 1"][3:6])]


def test_per_client_limit_answers_429_with_retry_after(tokenizer):
    src = BlockingSource(tokenizer)
    app = create_app(ServerConfig(max_client_requests=2, max_tokens=3), src)
    scheduler = app.fastapi.state.ft.scheduler
    with TestClient(app, base_url="http://127.0.0.1") as client:
        src.busy.set()
        assert _chat(client, "a").status_code == 200
        src.busy.clear()
        codes: list[int] = []
        threads = [
            threading.Thread(target=lambda: codes.append(_chat(client, "a").status_code)) for _ in range(2)
        ]
        for t in threads:
            t.start()
        _wait_until(lambda: scheduler.pending == 2)
        r = _chat(client, "a")
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "client_limit"
        assert client.get("/health").status_code == 200  # /health is never limited
        src.busy.set()
        for t in threads:
            t.join(60)
        assert codes == [200, 200]


def test_idle_connections_are_closed_first_when_a_client_has_too_many():
    import asyncio
    import socket

    import uvicorn

    from ft.server.protocol import guarded_protocol

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, http=guarded_protocol(30.0, 1024, per_client=4), log_level="warning", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    _wait_until(lambda: server.started)
    try:
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert s.recv(1024).startswith(b"HTTP/1.1 200")  # a request still gets in
        closed = []
        for s in idle:
            s.settimeout(0.5)
            try:
                closed.append(s.recv(1) == b"")
            except TimeoutError:
                closed.append(False)
            s.close()
        assert closed[:5] == [True] * 5 and closed[5:] == [False] * 3  # the oldest idle ones made room
    finally:
        server.should_exit = True
        thread.join(10)

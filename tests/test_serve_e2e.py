"""`ft serve` end to end: a real server subprocess with the embedded SmolLM2, driven by the official
`openai` client, compared token for token with mlx-lm's own greedy generation.

One server for the whole module (loading the model is the slow part).
"""

from __future__ import annotations

import time

import httpx
import pytest

from serve_helpers import BASE, CHECKPOINT, RUN_ID, RUN_NAME, add_tuned_run, make_workspace, start_server

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.e2e

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write one sentence about a cat."}]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_dir):
    """(server, references): the server, and mlx-lm's greedy outputs computed in this process."""
    from mlx_lm import generate

    from ft.models.loading import load_model_dir

    tmp = tmp_path_factory.mktemp("serve-e2e")
    ws = make_workspace(tmp / "ws", smollm2_dir)
    tuned_model, tok = add_tuned_run(ws)
    # Start the server first: it loads its model while this process computes the references.
    server = start_server(ws, tmp, "--model", BASE, "--max-tokens", "64", wait_ready=False)
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
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


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
        model=BASE, messages=STORY, temperature=0, max_tokens=MAX_TOKENS, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
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
    r = client.chat.completions.create(model=BASE, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS, stop=["Paris", "zzz"])
    assert r.choices[0].message.content == full[:cut]
    assert r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=BASE, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS,
                                            stop=["Paris"], stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == full[:cut]


def test_tuned_run_by_name_differs_from_base_and_equals_mlx_lm(client, served):
    server, refs = served
    assert refs["tuned_question"] != refs["question"]
    r = client.chat.completions.create(model=RUN_ID, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)
    assert r.model == RUN_ID
    assert r.choices[0].message.content == refs["tuned_question"]
    by_name = client.chat.completions.create(model=RUN_NAME, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)
    assert by_name.model == RUN_NAME and by_name.choices[0].message.content == refs["tuned_question"]
    # and back: the base model is swapped in again (one model in memory) and still gives its own answer
    r = client.chat.completions.create(model=BASE, messages=QUESTION, temperature=0, max_tokens=MAX_TOKENS)
    assert r.choices[0].message.content == refs["question"]
    log = server.log()
    assert f"loaded {RUN_ID}" in log and f"unloaded {RUN_ID}" in log


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
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=60) as r:
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

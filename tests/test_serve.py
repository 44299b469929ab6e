"""`llmkit serve`: a real uvicorn server on a free loopback port, driven by the official `openai` client and
by raw httpx requests. Tiny random models keep the whole file fast; requests that must stay in flight are
slowed by wrapping the engine's `step` with a sleep (test-only)."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from conftest import shared_file
from llmkit.chat import ChatTemplate, encode_chat, save_chat_template
from llmkit.infer.generate import SamplingParams, stream_tokens
from llmkit.models.decoder import Decoder, DecoderConfig
from llmkit.models.io import save_model
from llmkit.serve import ServeConfig, create_app
from llmkit.serve.app import GracefulServer
from llmkit.serve.protocol import IncrementalDecoder
from llmkit.tokenizer import train_bpe, train_char

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A chat-capable tiny decoder: char tokenizer (it has the chat special tokens) + default template."""
    d = tmp_path_factory.mktemp("serve") / "tiny-chat"
    tok = train_char([TEXT])
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=2, d_model=32, n_head=2))
    save_model(model.eval(), d, tokenizer=tok)
    save_chat_template(d, ChatTemplate())
    return d


@pytest.fixture(scope="module")
def loaded(model_dir):
    from llmkit.infer.load import load_for_inference

    return load_for_inference(model_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(base: str, name: str) -> float:
    """One sample of the server's /metrics (0 if absent)."""
    for ln in httpx.get(base + "/metrics").text.splitlines():
        if ln.startswith(name + " "):
            return float(ln.split(" ")[1])
    return 0.0


@contextlib.contextmanager
def running_server(model_dir: Path, on_engine_failure=None, **cfg):
    """Yield (base url, app, server) of a real uvicorn server in a background thread."""
    import uvicorn

    port = _free_port()
    cfg.setdefault("device", "cpu")
    app = create_app(ServeConfig(model=str(model_dir), port=port, **cfg), on_engine_failure=on_engine_failure)
    server = GracefulServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.02)
    try:
        yield base, app, server
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def slow_engine(app, delay: float, no_eos: bool = False) -> None:
    """Make every engine step take `delay` more seconds, so requests stay in flight (test-only); no_eos:
    completions never end early (the random model's EOS is ignored)."""
    eng = app.state.runner.engine
    if no_eos:
        eng.eos_ids = set()
    step = eng.step

    def slow():
        time.sleep(delay)
        return step()

    eng.step = slow


def wait_for(cond, timeout=5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(model_dir, served_model_name="tiny", max_batch=4, max_queue=16,
                        max_request_bytes=20_000) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _greedy_reference(loaded, ids, max_new, stop_ids=()) -> str:
    model, tok, _ = loaded
    out = []
    for t in stream_tokens(model, ids, SamplingParams(max_new_tokens=max_new, temperature=0), eos_id=tok.eos_id):
        if t in stop_ids:
            break
        out.append(t)
    return tok.decode(out, skip_special_tokens=True)


# -- the OpenAI client against the server ----------------------------------------------------------

def test_models_and_greedy_completion_matches_reference(client, loaded):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    _, tok, _ = loaded
    prompt = "To be, or not"
    want = _greedy_reference(loaded, tok.encode(prompt), 30)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == want
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # streamed: the same text, in pieces
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # a token-id prompt and a list of prompts
    r2 = client.completions.create(model="tiny", prompt=tok.encode(prompt), max_tokens=30, temperature=0)
    assert r2.choices[0].text == want
    r3 = client.completions.create(model="tiny", prompt=[prompt, "whether"], max_tokens=8, temperature=0)
    assert [c.index for c in r3.choices] == [0, 1] and r3.choices[0].text == want[:len(r3.choices[0].text)]


def test_chat_greedy_matches_reference_and_stream(client, loaded):
    _, tok, template = loaded
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "to be?"}]
    ids, _ = encode_chat(tok, messages, template, add_generation_prompt=True)
    want = _greedy_reference(loaded, ids, 40, set(template.stop_token_ids(tok)))
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_n_seed_stop_and_logprobs(client, loaded):
    msgs = [{"role": "user", "content": "the question"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=20, temperature=1.0, n=2, seed=7)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # same seed
    # choice i uses seed + i: choice 1 of seed 7 is choice 0 of seed 8
    c = client.chat.completions.create(**{**kw, "n": 1, "seed": 8})
    assert c.choices[0].message.content == a.choices[1].message.content
    # stop strings cut the text (greedy reference text, cut at a substring of it)
    full = client.completions.create(model="tiny", prompt="whether", max_tokens=30, temperature=0).choices[0].text
    stop = full[6:8]
    cut = full[:full.find(stop)]
    r = client.completions.create(model="tiny", prompt="whether", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="whether", max_tokens=30, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == cut
    # logprobs, chat shape: one entry per token, greedy token = best alternative
    lp = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                        top_logprobs=3)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in content)
    assert all(abs(e.logprob - e.top_logprobs[0].logprob) < 1e-5 for e in content)
    # special tokens (a random model emits some) are listed in logprobs but skipped in the text
    assert re.sub(r"<\|[a-z]+\|>", "", "".join(e.token for e in content)) == lp.choices[0].message.content
    # completions shape
    lc = client.completions.create(model="tiny", prompt="whether", max_tokens=5, temperature=0, logprobs=2)
    L = lc.choices[0].logprobs
    assert len(L.tokens) == len(L.token_logprobs) == len(L.text_offset) == 5 and all(len(t) == 2 for t in
                                                                                      L.top_logprobs)
    assert L.text_offset[0] == 0 and L.text_offset == sorted(L.text_offset) and L.text_offset[-1] <= len(
        lc.choices[0].text)


# -- errors ---------------------------------------------------------------------------------------

BAD = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", b"[" * 9000 + b"]" * 9000, 400, None),  # parser recursion, not a 500
    ("/v1/chat/completions", {"model": "tiny"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "<|end|>x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": 3}, 400,
     "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400,
     "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 9}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 400, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "presence_penalty": -3}, 400,
     "presence_penalty"),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "to be " * 60}]}, 400, "messages"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt"),
    ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10 ** 9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    # values that used to reach the sampler and make NaN / overflow, or a 500 before validation
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 1e-45}, 400, "repetition_penalty"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "messages[0].content"),
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "x"}', 400, "model"),
    ("/v1/completions", b'{"prompt": ["ok", "\\udfff"]}', 400, "prompt[1]"),
    ("/v1/completions", b'{"prompt": "x", "\\ud800": 1}', 400, "<key>"),
    # more engine requests than the queue holds can never be admitted: 400, not 429 forever
    ("/v1/completions", {"prompt": ["a"] * 9, "n": 2}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 65}, 400, "prompt"),
]


@pytest.mark.parametrize("path,body,status,param", BAD)
def test_bad_requests_get_openai_errors_and_server_keeps_serving(server, path, body, status, param):
    base = server[0]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(base + path, content=raw, headers={"content-type": "application/json"}, timeout=10)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and "code" in err
    assert err["param"] == param
    if status == 404:
        assert err["code"] == "model_not_found"
    ok = httpx.post(base + "/v1/completions", json={"prompt": "to", "max_tokens": 2}, timeout=10)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_max_tokens_beyond_context_is_clamped(server):
    r = httpx.post(server[0] + "/v1/completions", json={"prompt": "to be", "max_tokens": 10 ** 9,
                                                        "temperature": 0}, timeout=30)
    assert r.status_code == 200
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    assert choice["finish_reason"] == "stop" or usage["prompt_tokens"] + usage["completion_tokens"] == 256


def test_unknown_route_and_body_limit(server):
    base = server[0]
    r = httpx.get(base + "/v1/nope")
    assert r.status_code == 404 and "error" in r.json()
    big = json.dumps({"prompt": "x" * 30_000}).encode()
    r = httpx.post(base + "/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunked():  # no Content-Length: the server counts while reading
        for _ in range(30):
            yield b" " * 1000

    r = httpx.post(base + "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.post(base + "/v1/completions", json={"prompt": "to", "max_tokens": 1}).status_code == 200


# -- load, disconnects, auth, metrics, shutdown ---------------------------------------------------------

def test_queue_full_429_and_disconnect_cancels(model_dir):
    with running_server(model_dir, max_batch=1, max_queue=1) as (base, app, _):
        runner = app.state.runner
        slow_engine(app, 0.01, no_eos=True)
        body = {"prompt": "to be", "max_tokens": 200, "stream": True}
        with httpx.Client(base_url=base, timeout=30) as ca, httpx.Client(base_url=base, timeout=30) as cb:
            with ca.stream("POST", "/v1/completions", json=body) as ra:
                lines = ra.iter_lines()
                first = json.loads(next(ln for ln in lines if ln.startswith("data: "))[6:])
                assert wait_for(lambda: runner.stats()["running"] == 1)
                with cb.stream("POST", "/v1/completions", json=body) as rb:  # waits for the one slot
                    assert rb.status_code == 200
                    assert wait_for(lambda: runner.stats()["waiting"] == 1)
                    r = httpx.post(base + "/v1/completions", json=body, timeout=10)
                    assert r.status_code == 429 and r.headers["retry-after"] == "1"
                    assert r.json()["error"]["code"] == "queue_full"
                # rb closed before its first token: cancelled while waiting
            # ra closed mid-stream: cancelled, its slot freed at once
        assert wait_for(lambda: runner.stats()["running"] == 0 and runner.stats()["waiting"] == 0, 3)
        assert (first["id"] + "-0", "cancelled") in runner.finished_log
        # both dropped streams count as cancelled (nobody reads their last event: the stream counts them)
        assert metric(base, 'llmkit_request_success_total{finish_reason="cancelled"}') == 2
        # a non-streaming client that gives up (read timeout) is cancelled too
        n_cancelled = sum(1 for _, why in runner.finished_log if why == "cancelled")
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
        assert wait_for(lambda: sum(1 for _, why in runner.finished_log if why == "cancelled") > n_cancelled, 3)
        assert wait_for(lambda: runner.stats()["running"] == 0, 3)
        metrics = httpx.get(base + "/metrics").text
        assert 'llmkit_http_requests_total{status="429"} 1.0' in metrics
        assert 'llmkit_request_success_total{finish_reason="cancelled"}' in metrics


def test_api_key(model_dir):
    with running_server(model_dir, api_key="s3cret") as (base, _, _):
        bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        r = httpx.post(base + "/v1/completions", json={"prompt": "to"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(base + "/health").status_code == 200  # open for load balancers
        good = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="tiny-chat", prompt="to", max_tokens=3).choices[0].text is not None


def test_metrics_after_requests(server, client):
    client.completions.create(model="tiny", prompt="to be", max_tokens=5, temperature=0)
    text = httpx.get(server[0] + "/metrics").text
    for name in ("llmkit_time_to_first_token_seconds", "llmkit_time_per_output_token_seconds",
                 "llmkit_e2e_request_latency_seconds", "llmkit_num_requests_waiting",
                 "llmkit_num_requests_running", "llmkit_kv_cache_usage_ratio", "llmkit_prefix_cache_hit_rate"):
        assert name in text
    values = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines() if ln and ln[0] != "#"}
    assert values["llmkit_prompt_tokens_total"] > 0 and values["llmkit_generation_tokens_total"] > 0
    assert values["llmkit_e2e_request_latency_seconds_count"] > 0
    assert values['llmkit_http_requests_total{status="200"}'] > 0
    assert values['llmkit_http_requests_total{status="400"}'] > 0


def test_index_page(server):
    r = httpx.get(server[0] + "/")
    assert r.status_code in (200, 404)  # the page is written separately; 404 is an OpenAI-style error
    if r.status_code == 404:
        assert "error" in r.json()


def test_graceful_shutdown_ends_in_flight_requests(model_dir):
    with running_server(model_dir, shutdown_grace=1.5) as (base, app, server):
        runner = app.state.runner
        slow_engine(app, 0.02, no_eos=True)  # 200 tokens take 4 s: the grace period ends first
        result = {}

        def call():
            result["r"] = httpx.post(base + "/v1/completions", json={"prompt": "to", "max_tokens": 200}, timeout=30)

        t = threading.Thread(target=call)
        t.start()
        assert wait_for(lambda: runner.stats()["running"] == 1)
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn does on SIGTERM
        assert runner.draining
        # during the grace period the listener stays open: new clients get 503, not "connection refused"
        assert httpx.get(base + "/health", timeout=5).status_code == 503
        r = httpx.post(base + "/v1/completions", json={"prompt": "to"}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        t.join(timeout=20)
        # cancelled by the shutdown: an honest 503, not a 200 with the non-OpenAI finish_reason "cancelled"
        r = result["r"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
        assert wait_for(lambda: server.should_exit, 10)
        assert wait_for(lambda: not runner.alive, 10)


def test_shutdown_ends_a_stream_with_an_error_chunk_and_no_done(model_dir):
    with running_server(model_dir, shutdown_grace=0.3) as (base, app, server):
        slow_engine(app, 0.02, no_eos=True)
        with httpx.Client(base_url=base, timeout=30) as c, c.stream(
                "POST", "/v1/completions", json={"prompt": "to", "max_tokens": 200, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(ln for ln in lines if ln.startswith("data: "))
            server.handle_exit(signal.SIGTERM, None)
            rest = [ln[6:] for ln in lines if ln.startswith("data: ")]
        assert "[DONE]" not in rest
        last = json.loads(rest[-1])
        assert last["choices"][0]["finish_reason"] == "error" and last["error"]["code"] == "shutting_down"


# -- HTTP hygiene ------------------------------------------------------------------------------------

def test_no_host_reflecting_redirect_head_and_page_headers(server):
    base = server[0]
    r = httpx.post(base + "/v1/completions/", json={"prompt": "to"}, headers={"Host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers
    assert httpx.head(base + "/health").status_code == 200
    page = httpx.head(base + "/")
    assert page.status_code == 200
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    csp = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in \
        csp.split("script-src")[1].split(";")[0]


def test_unhandled_error_is_a_counted_generic_500(server, monkeypatch):
    from llmkit.serve import protocol

    def broken(body, ctx):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(protocol, "parse_completion", broken)
    before = metric(server[0], 'llmkit_http_requests_total{status="500"}')
    r = httpx.post(server[0] + "/v1/completions", json={"prompt": "to"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "secret" not in r.text and "RuntimeError" not in r.text
    assert metric(server[0], 'llmkit_http_requests_total{status="500"}') == before + 1


def test_a_bug_while_streaming_ends_the_stream_as_failed(server, monkeypatch):
    from llmkit.serve import protocol

    def broken(*a, **k):
        raise RuntimeError("secret formatting bug")

    monkeypatch.setattr(protocol, "completion_logprobs", broken)
    chunks, done = _stream_tokens(server[0], {"prompt": "to", "max_tokens": 5, "logprobs": 1, "stream": True})
    assert not done and chunks[-1]["choices"][0]["finish_reason"] == "error"
    assert chunks[-1]["error"]["message"] == "internal server error" and "secret" not in json.dumps(chunks)


def test_parsing_and_tokenizing_run_off_the_event_loop(server, monkeypatch):
    """A 1 MB prompt list takes a while to tokenize: it must not block the loop every stream runs on."""
    from llmkit.serve import protocol

    threads = []
    real = protocol.parse_completion

    def recording(body, ctx):
        threads.append(threading.current_thread())
        return real(body, ctx)

    monkeypatch.setattr(protocol, "parse_completion", recording)
    server_thread = server[2]  # uvicorn's loop runs in the thread that runs server.run
    assert httpx.post(server[0] + "/v1/completions", json={"prompt": "to", "max_tokens": 1}).status_code == 200
    loop_threads = [t for t in threading.enumerate() if getattr(t, "_target", None) == server_thread.run]
    assert loop_threads and threads and threads[0] not in loop_threads


def test_prompt_list_is_tokenized_in_one_batch_call(loaded):
    """One encode_batch call (the Rust encoder drops the GIL) instead of an encode per prompt (which holds
    it and stalls the engine thread at every torch call: measured by serve_malformed.py's stall figure)."""
    from llmkit.serve import protocol

    _, tok, template = loaded
    calls = []

    class CountingTok:
        vocab_size = tok.vocab_size

        def encode(self, text):
            calls.append("encode")
            return tok.encode(text)

        def encode_batch(self, texts):
            calls.append(("batch", len(texts)))
            return tok.encode_batch(texts)

    ctx = protocol.Context("tiny", CountingTok(), 256, template)
    parsed = protocol.parse_completion({"prompt": ["to be", [3, 4], "or not"], "max_tokens": 2}, ctx)
    assert calls == [("batch", 2)]
    assert parsed.prompts == [tok.encode("to be"), [3, 4], tok.encode("or not")]


def test_api_key_challenge_and_utf8_key(model_dir):
    with running_server(model_dir, api_key="ключ-🔑") as (base, _, _):
        r = httpx.post(base + "/v1/completions", json={"prompt": "to"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        key = "Bearer ключ-🔑".encode()  # header bytes as a client sends them: UTF-8
        ok = httpx.post(base + "/v1/completions", json={"prompt": "to", "max_tokens": 2},
                        headers={"Authorization": key})
        assert ok.status_code == 200
        latin1 = httpx.post(base + "/v1/completions", json={"prompt": "to"},
                            headers={"Authorization": "Bearer ключ-🔑".encode().decode("latin-1")
                                     .encode("utf-8")})
        assert latin1.status_code == 401


# -- one request must never hurt another --------------------------------------------------------------

def _stream_tokens(base: str, body: dict) -> tuple[list[dict], bool]:
    """(the data chunks of a streamed completion, whether it ended with [DONE])."""
    chunks, done = [], False
    with httpx.Client(timeout=60) as c, c.stream("POST", base + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for ln in r.iter_lines():
            if ln == "data: [DONE]":
                done = True
            elif ln.startswith("data: "):
                chunks.append(json.loads(ln[6:]))
    return chunks, done


def test_hostile_requests_leave_an_unrelated_stream_whole(model_dir):
    """While one stream runs, hostile requests (values that made NaN / overflow, the prompt list whose
    failed prefill used to kill the engine thread) come and go; the stream still gets every token."""
    with running_server(model_dir, max_batch=4, max_queue=16) as (base, app, _):
        slow_engine(app, 0.005, no_eos=True)
        result = {}
        t = threading.Thread(target=lambda: result.update(
            s=_stream_tokens(base, {"prompt": "to be", "max_tokens": 120, "temperature": 0, "stream": True,
                                    "stream_options": {"include_usage": True}})))
        t.start()
        assert wait_for(lambda: app.state.runner.stats()["running"] >= 1)
        hostile = [
            {"prompt": ["word " * 40, "hi"], "max_tokens": 5, "temperature": 1e-40},
            {"prompt": "to", "max_tokens": 5, "repetition_penalty": 1e-45},
            {"prompt": "to", "max_tokens": 5, "top_k": 2 ** 63, "temperature": 1},
            {"prompt": "to", "max_tokens": 5, "temperature": 1e-40, "stream": True},
        ]
        statuses = [httpx.post(base + "/v1/completions", json=b, timeout=30).status_code for b in hostile]
        assert statuses == [200, 400, 200, 200]
        t.join(timeout=60)
        chunks, done = result["s"]
        assert done and chunks[-1]["usage"]["completion_tokens"] == 120
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
        assert app.state.runner.alive and httpx.get(base + "/health").status_code == 200


def test_a_request_whose_logits_turn_nan_fails_alone(model_dir):
    """If a request's logits become NaN anyway (a model fault on its input), only its stream ends, with an
    error chunk (finish_reason "error", an error object, no [DONE], no exception text); a concurrent
    stream completes with its full token count."""
    with running_server(model_dir, max_batch=4) as (base, app, _):
        eng = app.state.runner.engine
        slow_engine(app, 0.005, no_eos=True)
        poison = app.state.context.tokenizer.encode("whether")
        real_decode = eng._decode

        def nan_for_poison():
            logits = real_decode()
            for i, r in enumerate(eng.running):
                if r.prompt == poison:
                    logits[i] = float("nan")
            return logits

        eng._decode = nan_for_poison
        result = {}
        t = threading.Thread(target=lambda: result.update(
            s=_stream_tokens(base, {"prompt": "to be", "max_tokens": 60, "temperature": 0, "stream": True})))
        t.start()
        assert wait_for(lambda: app.state.runner.stats()["running"] >= 1)
        bad, done = _stream_tokens(base, {"prompt": "whether", "max_tokens": 60, "stream": True})
        assert not done
        assert bad[-1]["choices"][0]["finish_reason"] == "error" and bad[-1]["error"]["type"] == "server_error"
        assert "Traceback" not in json.dumps(bad[-1])
        r = httpx.post(base + "/v1/completions", json={"prompt": "whether", "max_tokens": 5})
        assert r.status_code == 500 and r.json()["error"]["message"]
        assert metric(base, 'llmkit_request_success_total{finish_reason="error"}') == 2
        t.join(timeout=60)
        chunks, done = result["s"]
        assert done and sum(len(c["choices"][0]["text"]) for c in chunks) > 0
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert len(app.state.context.tokenizer.encode(text)) == 60  # char tokenizer: one token a character
        assert httpx.get(base + "/health").status_code == 200


def test_engine_failure_fails_every_request_refuses_new_ones_and_calls_exit(model_dir):
    """An engine whose every step raises (a broken device): the requests get errors (no exception text),
    after MAX_CONSECUTIVE_STEP_FAILURES the thread is declared dead, queued requests get an error instead
    of hanging, /health and new requests answer 503, and the server's exit callback runs."""
    from llmkit.serve.runner import MAX_CONSECUTIVE_STEP_FAILURES

    died = []
    with running_server(model_dir, max_batch=1, on_engine_failure=died.append) as (base, app, _):
        runner = app.state.runner

        def broken_step():
            time.sleep(0.05)
            raise RuntimeError("CUDA error: secret device detail")

        runner.engine.step = broken_step
        for _ in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):
            r = httpx.post(base + "/v1/completions", json={"prompt": "to", "max_tokens": 5}, timeout=30)
            assert r.status_code == 500 and "secret" not in r.text and "CUDA" not in r.text
        assert runner.alive and not died
        chunks, done = _stream_tokens(base, {"prompt": "to", "max_tokens": 5, "stream": True})
        assert not done and chunks[-1]["choices"][0]["finish_reason"] == "error"
        assert wait_for(lambda: died, 10) and isinstance(died[0], RuntimeError)
        assert not runner.alive and runner.dead
        assert httpx.get(base + "/health").status_code == 503
        r = httpx.post(base + "/v1/completions", json={"prompt": "to"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_down"


def test_engine_thread_death_delivers_errors_to_queued_requests(model_dir):
    """An error outside a step (here: the engine's bookkeeping) ends the thread at once: the running and
    the queued request both get an error rather than waiting forever."""
    died = []
    with running_server(model_dir, max_batch=1, on_engine_failure=died.append) as (base, app, _):
        runner, eng = app.state.runner, app.state.runner.engine
        slow_engine(app, 0.02, no_eos=True)
        results = []

        def call():
            results.append(httpx.post(base + "/v1/completions", json={"prompt": "to", "max_tokens": 100},
                                      timeout=30))

        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        assert wait_for(lambda: runner.stats()["running"] == 1 and runner.stats()["waiting"] == 1)

        def broken_pop():
            raise KeyError("bookkeeping")

        eng.pop_finished = broken_pop
        for t in threads:
            t.join(timeout=30)
        assert [r.status_code for r in results] == [500, 500]
        assert all(r.json()["error"]["message"] == "the inference engine stopped; the server is restarting"
                   for r in results)
        assert died and runner.dead


def test_llmkit_serve_process_exits_nonzero_when_the_engine_dies(model_dir, tmp_path):
    """The real CLI in a subprocess, with a step that always fails (patched by this test's launcher, not by
    the product): after the failures the process exits with status 1 for its supervisor to restart."""
    import subprocess
    import sys

    port = _free_port()
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import sys\n"
        "from llmkit.infer.engine import Engine\n"
        "def broken(self):\n"
        "    raise RuntimeError('device lost')\n"
        "Engine.step = broken\n"
        "from llmkit.cli import main\n"
        f"sys.exit(main(['serve', '--model', {str(model_dir)!r}, '--port', '{port}']))\n")
    proc = subprocess.Popen([sys.executable, str(launcher)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: _health(base) == 200, 60), proc.stderr.read().decode()[-2000:]
        from llmkit.serve.runner import MAX_CONSECUTIVE_STEP_FAILURES

        for _ in range(MAX_CONSECUTIVE_STEP_FAILURES):
            r = httpx.post(base + "/v1/completions", json={"prompt": "to", "max_tokens": 3}, timeout=30)
            assert r.status_code == 500
        assert proc.wait(timeout=30) == 1
        assert b"engine thread died" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _health(base: str) -> int | None:
    try:
        return httpx.get(base + "/health", timeout=1).status_code
    except httpx.TransportError:
        return None


# -- the malformed suite and a fuzz run (benchmarks/serve_malformed.py) ---------------------------------

def _malformed_module():
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_malformed.py"
    spec = importlib.util.spec_from_file_location("serve_malformed", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_malformed_suite_and_fuzz_no_5xx_no_hang_witness_unharmed(model_dir):
    mod = _malformed_module()
    with running_server(model_dir, api_key="sk-test", max_request_bytes=65536, max_queue=16) as (base, app, _):
        report = mod.run_suite(base, "sk-test", 65536)
        assert report["failures"] == [] and report["unexpected"] == [], report
        assert report["n_cases"] == len(mod.CASES) and all(
            row.get("server_still_serving") for row in report["cases"].values())
        fuzz = mod.run_fuzz(base, "sk-test", n=200, seed=0, max_seconds=120, concurrency=4, timeout=30)
        assert fuzz["mutations"] == 200
        assert fuzz["server_errors"] == 0 and fuzz["hung"] == 0 and fuzz["broken_streams"] == 0, fuzz
        assert fuzz["witness_runs"] >= 1 and fuzz["witness_unharmed"] == fuzz["witness_runs"], fuzz
        assert fuzz["witness_tokens"] > 0 and fuzz["ok"]
        assert app.state.runner.alive
    with pytest.raises(ValueError):  # never aimed at someone else's server by accident
        mod.run_fuzz("http://example.com", n=1)


# -- incremental UTF-8 decoding ---------------------------------------------------------------------

def test_incremental_decode_never_splits_chinese_characters():
    data = json.loads(shared_file("zh/lunyu.json").read_text(encoding="utf-8"))
    lines = [p for ch in data[:3] for p in ch["paragraphs"]]
    tok = train_bpe(lines, vocab_size=300)  # tiny vocabulary: most characters span several byte tokens
    text = "子曰：学而时习之，不亦说乎？" + lines[0]
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the hazard is real for this tokenizer
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.finish() == text
    # text that could begin a stop string is held back until it cannot
    dec = IncrementalDecoder(tok, stop=["不亦乐"])
    out = "".join(dec.push(i) for i in tok.encode("有朋自远方来，不亦说乎"))
    assert out + dec.finish() == "有朋自远方来，不亦说乎"
    dec = IncrementalDecoder(tok, stop=["不亦乐"])
    out = "".join(dec.push(i) for i in tok.encode("有朋，不亦"))
    assert out == "有朋，" and dec.finish("有朋，") == ""


def test_context_shrinks_to_the_kv_cache_budget_and_an_explicit_one_that_does_not_fit_is_refused(loaded):
    from llmkit.serve.app import context_length

    model = loaded[0]
    c = model.config  # 2 layers, 2 heads of 16, block 256, fp32: 2 * 2 * 2 * 16 * 4 = 512 bytes a token
    per_token = 2 * c.n_layer * c.kv_heads * c.head_dim * 4
    assert per_token == 512
    assert context_length(model, ServeConfig(model="m", max_batch=4)) == 256  # 2 GiB: the whole block
    budget = 4 * 100 * per_token / 2**30  # room for 4 requests of 100 tokens
    assert context_length(model, ServeConfig(model="m", max_batch=4, kv_cache_gb=budget)) == 100
    assert context_length(model, ServeConfig(model="m", max_batch=4, max_model_len=64, kv_cache_gb=budget)) == 64
    with pytest.raises(ValueError, match=r"max_model_len=200: 4 requests x 200 tokens .* kv_cache_gb"):
        context_length(model, ServeConfig(model="m", max_batch=4, max_model_len=200, kv_cache_gb=budget))
    with pytest.raises(ValueError, match="max_model_len=256"):  # not even 16 tokens fit
        context_length(model, ServeConfig(model="m", max_batch=4, kv_cache_gb=4 * 8 * per_token / 2**30))

"""Load test of `llmkit serve`: throughput, TTFT and latency percentiles, 429 share, no lost requests.

    python benchmarks/serve_load.py --quick                    # a tiny run (seconds): checks the harness
    python benchmarks/serve_load.py                            # 1, 4, 16, 64 streaming clients
    python benchmarks/serve_load.py --model runs/shakespeare/final --max-batch 16 --max-queue 16
    python benchmarks/serve_load.py --url http://127.0.0.1:8000  # an already running server or deployment

Unless ``--url`` is given it starts ``python -m llmkit serve`` as a subprocess on ``--model`` (default: a
randomly initialised GPT-2-style llmkit model, 4 layers, d_model 256, 4 heads, block 256, with a char
tokenizer trained on tinyshakespeare; written to a temporary directory) with a bounded ``--max-batch``
and ``--max-queue``: at 64 clients the load exceeds max_batch + max_queue, so part of it must be refused
with 429 + Retry-After instead of queueing without bound.

For every N in ``--clients``, N asyncio clients (httpx, one connection each) send
``--requests-per-client`` streaming ``/v1/chat/completions`` requests back to back (greedy,
``max_tokens``, a different slice of Shakespeare as the prompt of each). After a 429 a client sleeps the
Retry-After (capped at ``--retry-after-cap``, 1 s) and goes on with its next request; a refused request
is not re-sent. At overload levels the wall time therefore includes those waits: tokens/s and requests/s
are the goodput that polite clients get, not the server's peak.
Measured per N:

* throughput: completion tokens/s (the streamed content chunks; the usage of the final chunk when the
  server sends it) and completed requests/s, over the wall time of the level;
* TTFT (request sent -> first content chunk) and end-to-end latency (-> ``data: [DONE]``), p50/p95/p99,
  of the completed requests;
* accounting: ``sent == completed + rejected + errors + hung``. completed: 200, a finish chunk with
  finish_reason "stop" or "length", the usage's completion_tokens matching it ("length": max_tokens, or
  the context left after the prompt; "stop": 1..max_tokens), no error chunk, and ``data: [DONE]``;
  rejected: 429 (its share is reported); errors: any other status, a stream carrying an error chunk (the
  server ends a failed stream with finish_reason "error" and an error object), or one that ends without
  all of the above; hung: no end within ``--timeout`` seconds. ``ok`` is true when no request was lost
  (errors == hung == 0).

Prints one JSON object: the settings, the machine, the server's flags, and one entry per N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import httpx

SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "en" / "tinyshakespeare.txt"
FALLBACK_TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
                 "First Citizen:\nYou are all resolved rather to die than to famish?\n") * 20


def corpus_text() -> str:
    return SHAKESPEARE.read_text(encoding="utf-8") if SHAKESPEARE.is_file() else FALLBACK_TEXT


def build_model(out_dir: Path, n_layer: int = 4, d_model: int = 256, n_head: int = 4, block_size: int = 256) -> Path:
    """A randomly initialised GPT-2-style llmkit model with a char tokenizer, as a model directory."""
    import torch

    from llmkit.chat import chat_template_for, save_chat_template
    from llmkit.models import Decoder, DecoderConfig, save_model
    from llmkit.tokenizer import train_char

    torch.manual_seed(0)
    text = corpus_text()
    tok = train_char([text])
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer,
                                  d_model=d_model, n_head=n_head)).eval()
    with torch.no_grad():  # specials (ids after the characters) get logit 0: a random model keeps talking
        model.lm_head.weight[len(set(text)):] = 0
    out = save_model(model, out_dir, tok)
    save_chat_template(out, chat_template_for(tok))  # so /v1/chat/completions accepts it
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, serve_args: list[str], log_path: Path,
                 timeout_s: float = 180.0) -> subprocess.Popen:
    """``python -m llmkit serve`` on 127.0.0.1:`port`, returned once /health answers 200."""
    argv = [sys.executable, "-m", "llmkit", "serve", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), *serve_args]
    out = open(log_path, "wb")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llmkit serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"llmkit serve not ready within {timeout_s} s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p95": None, "p99": None, "mean": None}
    s = sorted(xs)

    def q(p: float) -> float:  # linear interpolation between closest ranks (numpy's default)
        k = (len(s) - 1) * p
        lo = int(k)
        hi = min(lo + 1, len(s) - 1)
        return round(s[lo] + (s[hi] - s[lo]) * (k - lo), 4)

    return {"p50": q(0.50), "p95": q(0.95), "p99": q(0.99), "mean": round(sum(s) / len(s), 4)}


def _expected_tokens_ok(finish_reason: str | None, completion_tokens: int | None, prompt_tokens: int | None,
                        max_tokens: int, max_model_len: int | None) -> bool:
    """Does a finished stream's usage match its finish_reason? "length": max_tokens, or the context left
    after the prompt when max_tokens did not fit; "stop": between 0 and max_tokens (EOS or a stop string
    may come first; the stop token itself is not counted)."""
    if completion_tokens is None:
        return False
    if finish_reason == "length":
        room = None if max_model_len is None or prompt_tokens is None else max_model_len - prompt_tokens
        return completion_tokens == max_tokens or (room is not None and completion_tokens == room < max_tokens)
    if finish_reason == "stop":
        return 0 <= completion_tokens <= max_tokens
    return False


async def one_request(client: httpx.AsyncClient, url: str, body: dict, timeout_s: float,
                      max_model_len: int | None = None) -> dict:
    t0 = time.perf_counter()
    rec: dict = {"status": None, "ttft": None, "latency": None, "tokens": 0, "outcome": "error", "retry_after": None}

    async def run() -> None:
        async with client.stream("POST", url, json=body) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
                rec["outcome"] = "rejected" if r.status_code == 429 else "error"
                rec["retry_after"] = r.headers.get("retry-after")
                return
            usage, finish, error, done = None, None, None, False
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    error = chunk["error"]
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for ch in chunk.get("choices") or []:
                    finish = ch.get("finish_reason") or finish
                    if (ch.get("delta") or {}).get("content"):
                        if rec["ttft"] is None:
                            rec["ttft"] = time.perf_counter() - t0
                        rec["tokens"] += 1
            if usage is not None:
                rec["tokens"] = usage.get("completion_tokens")
            rec["finish_reason"] = finish
            if error is not None:
                rec["detail"] = f"error chunk: {error.get('message')}"
            elif not done:
                rec["detail"] = "stream ended without [DONE]"
            elif not _expected_tokens_ok(finish, (usage or {}).get("completion_tokens"),
                                         (usage or {}).get("prompt_tokens"), body["max_tokens"], max_model_len):
                rec["detail"] = f"finish_reason {finish!r} with usage {usage}"
            else:
                rec["outcome"] = "completed"

    try:
        await asyncio.wait_for(run(), timeout_s)
    except asyncio.TimeoutError:
        rec["outcome"] = "hung"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec["outcome"], rec["detail"] = "error", f"{type(e).__name__}: {e}"
    rec["latency"] = time.perf_counter() - t0
    return rec


async def run_level(base_url: str, model_name: str, n_clients: int, per_client: int, max_tokens: int,
                    prompts: list[str], timeout_s: float, api_key: str | None, retry_after_cap: float = 1.0,
                    max_model_len: int | None = None) -> dict:
    url = base_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=n_clients + 4, max_keepalive_connections=n_clients + 4)
    records: list[dict] = []
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(timeout_s)) as client:

        async def client_loop(c: int) -> None:
            for r in range(per_client):
                prompt = prompts[(c * per_client + r) % len(prompts)]
                body = {"model": model_name, "messages": [{"role": "user", "content": prompt}],
                        "max_tokens": max_tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}}
                rec = await one_request(client, url, body, timeout_s, max_model_len)
                records.append(rec)
                if rec["outcome"] == "rejected":
                    try:
                        wait = float(rec["retry_after"] or 1)
                    except ValueError:
                        wait = 1.0
                    await asyncio.sleep(min(retry_after_cap, max(0.0, wait)))

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in range(n_clients)))
        wall = time.perf_counter() - t0
    done = [r for r in records if r["outcome"] == "completed"]
    counts = {k: sum(r["outcome"] == k for r in records) for k in ("completed", "rejected", "error", "hung")}
    tokens = sum(r["tokens"] or 0 for r in done)
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    sent = len(records)
    return {
        "clients": n_clients, "sent": sent, **counts,
        "accounted": sent == counts["completed"] + counts["rejected"] + counts["error"] + counts["hung"],
        "lost": counts["error"] + counts["hung"], "status_counts": statuses,
        "rejected_share": round(counts["rejected"] / sent, 4) if sent else None,
        "wall_s": round(wall, 3), "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall else None,
        "requests_per_s": round(len(done) / wall, 3) if wall else None,
        "ttft_s": percentiles([r["ttft"] for r in done if r["ttft"] is not None]),
        "latency_s": percentiles([r["latency"] for r in done]),
        "error_samples": [r.get("detail") or r["status"] for r in records if r["outcome"] in ("error", "hung")][:5],
    }


def machine_facts() -> dict:
    facts = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        facts["torch"] = torch.__version__
    except ImportError:
        pass
    return facts


def scrape_metrics(base_url: str) -> dict:
    """The server's llmkit_ counters/gauges (unlabelled sums) after the run, for the record."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("llmkit_") or "_bucket" in line or "_created" in line:
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        try:
            out[name] = round(out.get(name, 0.0) + float(value), 4)
        except ValueError:
            pass
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: a random 4-layer model)")
    ap.add_argument("--url", default=None, help="benchmark a running server (or deployment) instead of starting one")
    ap.add_argument("--api-key", default=None, help="bearer key of the server given with --url")
    ap.add_argument("--clients", default=None, help="comma-separated concurrency levels (default 1,4,16,64)")
    ap.add_argument("--requests-per-client", type=int, default=None, help="default 4")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 64")
    ap.add_argument("--max-batch", type=int, default=None, help="the server's --max-batch (default 16)")
    ap.add_argument("--max-queue", type=int, default=None, help="the server's --max-queue (default 16)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds after which a request counts as hung")
    ap.add_argument("--retry-after-cap", type=float, default=1.0,
                    help="most seconds a client sleeps after a 429 (0: go on at once)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny run (seconds): 1 and 8 clients x 2 requests x 8 tokens on a 2-layer model, "
                         "max-batch 2 and max-queue 2 so that 8 clients also see 429s; explicit flags still apply")
    args = ap.parse_args(argv)
    defaults = (dict(clients="1,8", requests_per_client=2, max_tokens=8, max_batch=2, max_queue=2) if args.quick
                else dict(clients="1,4,16,64", requests_per_client=4, max_tokens=64, max_batch=16, max_queue=16))
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    levels = [int(x) for x in args.clients.split(",") if x.strip()]

    text = corpus_text()
    prompts = [text[i:i + 48 + (i % 17)] for i in range(0, min(len(text) - 128, 200 * 997), 997)]
    tmp = tempfile.TemporaryDirectory(prefix="llmkit-serve-load-")
    proc = None
    server: dict = {}
    try:
        if args.url:
            base_url = args.url.rstrip("/")
            server = {"url": base_url, "started_here": False}
        else:
            model = args.model
            if model is None:
                shape = dict(n_layer=2, d_model=64, n_head=2, block_size=128) if args.quick else {}
                model = build_model(Path(tmp.name) / "model", **shape)
                server["model"] = {"random_init": True, "family": "gpt2", "tokenizer": "char (tinyshakespeare)",
                                   **(shape or dict(n_layer=4, d_model=256, n_head=4, block_size=256))}
            else:
                server["model"] = {"dir": str(model)}
            port = free_port()
            serve_args = ["--served-model-name", "bench", "--max-batch", str(args.max_batch),
                          "--max-queue", str(args.max_queue)]
            server.update(started_here=True, flags=serve_args)
            proc = start_server(model, port, serve_args, Path(tmp.name) / "server.log")
            base_url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        models = httpx.get(base_url + "/v1/models", headers=headers, timeout=30).json()
        model_name = models["data"][0]["id"]
        max_model_len = models["data"][0].get("max_model_len")  # to check a "length" finish's token count
        # warm-up: the first request pays for lazy initialisation
        asyncio.run(run_level(base_url, model_name, 1, 1, 4, prompts, args.timeout, args.api_key,
                              max_model_len=max_model_len))
        results = []
        for n in levels:
            results.append(asyncio.run(run_level(base_url, model_name, n, args.requests_per_client, args.max_tokens,
                                                 prompts, args.timeout, args.api_key, args.retry_after_cap,
                                                 max_model_len=max_model_len)))
        report = {
            "benchmark": "serve_load", "endpoint": "/v1/chat/completions (stream, greedy)",
            "settings": {"clients": levels, "requests_per_client": args.requests_per_client,
                         "max_tokens": args.max_tokens, "max_batch": args.max_batch, "max_queue": args.max_queue,
                         "timeout_s": args.timeout, "retry_after_cap_s": args.retry_after_cap, "quick": args.quick},
            "server": {**server, "served_model": model_name}, "machine": machine_facts(), "levels": results,
            "server_metrics": scrape_metrics(base_url),
            "ok": all(r["accounted"] and r["lost"] == 0 for r in results),
        }
        print(json.dumps(report, indent=1))
        return 0 if report["ok"] else 1
    finally:
        if proc is not None:
            stop_server(proc)
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())

"""`llmkit deploy`: the generated nginx configuration, the Kubernetes manifest, and N real replicas behind a
real nginx on loopback (load balancing, streaming through the proxy, failover and the supervisor's restart)."""

import json
import random
import re
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from llmkit.cli import main
from llmkit.serve.deploy import (
    DeployConfig,
    deploy,
    find_nginx,
    nginx_config,
    prepare_run_dir,
    run_deploy,
)

NGINX = find_nginx()
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light)")
MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "llmkit.yaml"


# -- nginx_config -----------------------------------------------------------------------------------

def _directives(conf: str) -> list[str]:
    """Every directive as one whitespace-normalised line, comments dropped."""
    lines = (re.sub(r"#.*", "", line).strip() for line in conf.splitlines())
    return [" ".join(line.split()) for line in lines if line]


def test_nginx_config_directives():
    conf = nginx_config([("127.0.0.1", 9001), ("10.0.0.2", 9002)], 9000, client_max_body_size="2m",
                        max_fails=2, fail_timeout_s=7)
    d = _directives(conf)
    assert conf.count("{") == conf.count("}")
    upstream = conf[conf.index("upstream llmkit {"):conf.index("}", conf.index("upstream llmkit {"))]
    assert "least_conn;" in upstream
    assert "server 127.0.0.1:9001 max_fails=2 fail_timeout=7s;" in d
    assert "server 10.0.0.2:9002 max_fails=2 fail_timeout=7s;" in d
    assert re.search(r"^\s*keepalive \d+;", upstream, re.M)
    for must in ("daemon off;", "pid nginx.pid;", "listen 127.0.0.1:9000;", "proxy_pass http://llmkit;",
                 "proxy_http_version 1.1;", 'proxy_set_header Connection "";', "proxy_buffering off;",
                 "proxy_cache off;", "client_max_body_size 2m;",
                 "proxy_next_upstream error timeout http_503 non_idempotent;", "proxy_next_upstream_tries 2;"):
        assert must in d, must
    read_timeout = next(x for x in d if x.startswith("proxy_read_timeout"))
    assert int(re.search(r"(\d+)s", read_timeout).group(1)) >= 600  # long generations are not cut
    # everything nginx writes is relative to its prefix (the run dir): no absolute paths, no system files
    for x in d:
        if x.split()[0] in ("pid", "error_log", "access_log") or x.split()[0].endswith("_temp_path"):
            assert x.split()[1] == "off" or not x.split()[1].startswith("/"), x
    assert "http_429" not in conf.split("proxy_next_upstream ")[1].split(";")[0]  # back pressure is not a fault
    safe = _directives(nginx_config([("127.0.0.1", 1)], 2, retry_non_idempotent=False))
    assert "proxy_next_upstream error timeout http_503;" in safe
    with pytest.raises(ValueError):
        nginx_config([], 8000)


@needs_nginx
def test_nginx_t_accepts_the_config_as_a_non_system_instance(tmp_path):
    prepare_run_dir(tmp_path)  # logs/ and tmp/
    (tmp_path / "nginx.conf").write_text(nginx_config([("127.0.0.1", 18001), ("127.0.0.1", 18002)], 18000))
    r = subprocess.run([NGINX, "-t", "-p", f"{tmp_path}/", "-c", "nginx.conf", "-e", "logs/error.log"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "syntax is ok" in r.stderr


def test_print_config_starts_nothing(capsys):
    assert run_deploy(print_config="nginx", replicas=3, port=9100) == 0
    out = capsys.readouterr().out
    assert [x for x in _directives(out) if x.startswith("server 127.0.0.1:")] == [
        f"server 127.0.0.1:{p} max_fails=3 fail_timeout=10s;" for p in (9101, 9102, 9103)]
    assert run_deploy(DeployConfig(print_config="kubernetes")) == 0
    assert "kind: HorizontalPodAutoscaler" in capsys.readouterr().out
    with pytest.raises(ValueError, match="model: required"):
        run_deploy(DeployConfig())


def _servers(out: str) -> list[str]:
    return [x for x in _directives(out) if x.startswith("server 127.0.0.1:")]


def test_cli_deploy_config_file_flags_and_overrides(tmp_path, capsys):
    """`--config FILE`, a flag (shorthand for its key) and `key=value`: the explicit override wins over the
    flag; a wrong key is refused naming the key and the file."""
    recipe = tmp_path / "deploy.yaml"
    recipe.write_text("print_config: nginx\nreplicas: 2\nport: 9200\nmax_fails: 5\n")
    assert main(["deploy", "--config", str(recipe)]) == 0
    assert _servers(capsys.readouterr().out) == [f"server 127.0.0.1:{p} max_fails=5 fail_timeout=10s;"
                                                 for p in (9201, 9202)]
    assert main(["deploy", "--config", str(recipe), "--replicas", "4", "replicas=3", "--port", "9300"]) == 0
    assert len(_servers(capsys.readouterr().out)) == 3  # replicas=3 beats --replicas 4; --port beats the file
    assert main(["deploy", "--print-config", "nginx", "--replicas", "1", "--", "--max-batch", "8"]) == 0
    capsys.readouterr()
    recipe.write_text("print_config: nginx\nreplica: 2\n")
    assert main(["deploy", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "'replica'" in err and str(recipe) in err
    recipe.write_text("print_config: nginx\n")
    assert main(["deploy", "--config", str(recipe), "replicas=two"]) == 2
    assert "command line: replicas: expected an integer" in capsys.readouterr().err


# -- Kubernetes manifest ------------------------------------------------------------------------------

def test_kubernetes_manifest_parses_and_is_consistent():
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= set(by_kind)
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d) and d["metadata"]["name"]
    dep, svc, hpa = by_kind["Deployment"], by_kind["Service"], by_kind["HorizontalPodAutoscaler"]
    assert dep["apiVersion"] == "apps/v1"
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "llmkit"]
    argv = [*c.get("command", []), *c.get("args", [])]
    assert "serve" in argv and argv[argv.index("--host") + 1] == "0.0.0.0"
    port = int(argv[argv.index("--port") + 1])
    assert port in [p["containerPort"] for p in c["ports"]]
    model = argv[argv.index("--model") + 1]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert any(model.startswith(p) for p in mounts.values())  # the model lives on a mounted volume
    volumes = {v["name"] for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert set(mounts) <= volumes
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health", probe
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert svc["apiVersion"] == "v1" and svc["spec"]["selector"].items() <= labels.items()
    assert any(p.get("targetPort") in (port, c["ports"][0].get("name")) for p in svc["spec"]["ports"])
    assert hpa["apiVersion"] == "autoscaling/v2"
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", dep["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource" and m["resource"]["name"] == "cpu"]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"


# -- end to end: 2 replicas behind nginx --------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_consecutive(n: int) -> int:
    for _ in range(100):
        base = random.randint(20000, 32000)  # below Linux's ephemeral range: no TCP self-connects while down
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free consecutive ports")


def _served_by(replica_url: str) -> float:
    """Finished engine requests of one replica, from its own /metrics."""
    import httpx

    text = httpx.get(replica_url + "/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("llmkit_request_success_total"))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    import torch

    from llmkit.chat import chat_template_for, save_chat_template
    from llmkit.models import Decoder, DecoderConfig, save_model
    from llmkit.tokenizer import train_char

    root = tmp_path_factory.mktemp("deploy")
    torch.manual_seed(0)
    text = "hello world, ROMEO: and JULIET. The quick brown fox jumps over the lazy dog\n"
    tok = train_char([text])
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=2, d_model=64,
                                  n_head=2)).eval()
    with torch.no_grad():  # specials (ids after the characters) get logit 0: greedy never ends the turn early
        model.lm_head.weight[len(set(text)):] = 0
    model_dir = save_model(model, root / "model", tok)
    save_chat_template(model_dir, chat_template_for(tok))  # /v1/chat/completions needs one
    ready: list = []
    stop = threading.Event()
    port, base = _free_port(), _free_consecutive(2)
    result: dict = {}

    def run():
        try:
            result["rc"] = deploy(model_dir, replicas=2, port=port, base_port=base, run_dir=root / "run",
                                  serve_args=["--served-model-name", "tiny", "--max-batch", "4"],
                                  stop_event=stop, on_ready=ready.append, health_timeout_s=120, poll_s=0.2,
                                  fail_timeout_s=2)
        except BaseException as e:  # surfaced by the fixture below
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 150
    while not ready and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not ready:
        stop.set()
        thread.join(60)
        raise AssertionError(f"deploy did not become ready: {result.get('error')!r}")
    yield ready[0]
    stop.set()
    thread.join(90)
    assert not thread.is_alive(), "deploy did not stop"
    assert result.get("rc") == 0, result
    dep = ready[0]
    assert all(c.proc.poll() is not None for c in [dep.nginx, *dep.replicas])  # nothing left running


def _chat(client, url, stream: bool, max_tokens: int = 12):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "ROMEO:"}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    if not stream:
        r = client.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.headers.get("x-upstream"), None
    pieces, times = [], []
    t0 = time.perf_counter()
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        upstream = r.headers.get("x-upstream")
        done = False
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            for ch in json.loads(data)["choices"]:
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    pieces.append(piece)
                    times.append(time.perf_counter() - t0)
        assert done, "stream ended without data: [DONE]"
    return "".join(pieces), upstream, times


def test_two_replicas_behind_nginx_balance_stream_and_fail_over(deployment):
    import httpx

    dep = deployment
    assert (dep.run_dir / "nginx.conf").is_file() and (dep.run_dir / "replica-1.log").is_file()
    with httpx.Client(timeout=60) as client:
        assert client.get(dep.url + "/health").status_code == 200
        # 10 requests, 4 streamed, sent 5 at a time: all succeed with the same greedy text
        with ThreadPoolExecutor(5) as pool:
            outs = list(pool.map(lambda i: _chat(client, dep.url, stream=i % 3 == 0), range(10)))
        texts = {t for t, _, _ in outs}
        assert len(texts) == 1 and next(iter(texts)), texts
        upstreams = {u for _, u, _ in outs}
        # both replicas served: each one's own counter (read on its port, not through nginx)
        served = [_served_by(dep.replica_url(i)) for i in range(2)]
        assert all(s >= 1 for s in served) and sum(served) >= 10, (served, upstreams)

        # streaming passes through nginx unbuffered: the first piece arrives well before the last
        text, _, times = _chat(client, dep.url, stream=True, max_tokens=200)
        assert len(times) >= 50
        assert times[-1] - times[0] > 0.05 and times[0] < 0.5 * times[-1], (times[0], times[-1])

        # kill replica 0: nginx keeps answering through replica 1 (a refused connection is retried there)
        victim = dep.replicas[0]
        old_pid = victim.proc.pid
        victim.proc.kill()
        victim.proc.wait()
        for i in range(6):
            t, upstream, _ = _chat(client, dep.url, stream=i % 2 == 1)
            assert t in texts
            assert upstream is None or upstream.endswith(f":{dep.ports[1]}"), upstream
        # the supervisor starts it again on the same port
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if victim.proc.pid != old_pid and victim.alive():
                try:
                    if client.get(dep.replica_url(0) + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        else:
            raise AssertionError("the killed replica was not restarted and healthy within 60 s")
        assert victim.restarts == 1 and any("exited" in e for e in dep.events)
        t, _, _ = _chat(client, dep.replica_url(0), stream=False)  # the restarted replica serves directly
        assert t in texts


def test_supervisor_restarts_a_dead_child_at_once_then_backs_off(tmp_path):
    import sys

    from llmkit.serve.deploy import Deployment, _Child

    dep = Deployment(run_dir=tmp_path, url="http://x", ports=[1], replica_host="127.0.0.1")
    child = _Child("replica 0", [sys.executable, "-c", "import sys; sys.exit(3)"], tmp_path / "replica-0.log")
    dep.replicas.append(child)
    child.start()
    child.proc.wait()
    dep.supervise_once()  # first death: restarted at once
    assert child.restarts == 1 and "exited with code 3" in dep.events[0]
    child.proc.wait()
    dep.supervise_once()  # died again within a minute: restarted only after the back-off
    assert child.restarts == 1 and child.next_start > time.monotonic() and child.backoff_s == 2.0
    child.next_start = time.monotonic()  # let the back-off pass
    dep.supervise_once()
    assert child.restarts == 2
    dep.stop(timeout_s=5)
    assert child.proc.poll() is not None and dep.stopping
    dep.supervise_once()  # stopping: nothing restarts
    assert child.restarts == 2
    assert child.log_path.read_text().count("=== ") == 3  # one header per start, all in the same log

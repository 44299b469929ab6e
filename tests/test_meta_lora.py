"""Meta-learned LoRA initialisation: Reptile / FO-MAML update math against hand computations, tasks built from
instruction files (held-out tasks never meta-trained, malformed records counted), lora.init_from in SFT
(exact load, mismatch errors), resume of a killed run, the CLI end to end, and the benchmark's decision rule."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.cli import main
from llmkit.config import load_config
from llmkit.finetune import meta_lora
from llmkit.finetune.meta_lora import (
    MetaLoRAConfig,
    MetaTasksConfig,
    adapt_and_score,
    adaptation_verdict,
    build_tasks,
    category_of,
    language_of,
    make_batch,
    meta_step,
    meta_train_lora,
)
from llmkit.finetune.sft import SFTConfig, prepare_model
from llmkit.models.lora import LoRAConfig, apply_lora, lora_parameters

TOPICS = ["the sea", "a cat", "the moon", "bread", "a train", "rain", "music", "a garden", "winter", "a river",
          "the city", "coffee", "a book", "the sun", "a dog", "snow"]
VERBS = {"write": "Write a short line about {}.", "explain": "Explain why people like {}.",
         "list": "List two facts about {}.", "rewrite": "Rewrite this sentence: I saw {} today."}


def _records() -> list:
    recs = []
    for cat, pattern in VERBS.items():
        for i, topic in enumerate(TOPICS):
            recs.append({"instruction": pattern.format(topic), "input": "",
                         "output": f"{cat} answer {i}: {topic} is {'good' if i % 2 else 'fine'}."})
    recs.append({"instruction": "Write a line about nothing."})  # malformed: no output
    recs.append(7)  # malformed: not an object
    return recs


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama-style decoder + BPE tokenizer (with the chat tokens) and an alpaca file of 4 x 16 tasks."""
    from llmkit.models.decoder import Decoder, DecoderConfig
    from llmkit.models.io import save_model
    from llmkit.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("meta")
    (root / "tasks.json").write_text(json.dumps(_records()))
    (root / "clean.json").write_text(json.dumps([r for r in _records() if isinstance(r, dict) and "output" in r]))
    tok = train_tokenizer([str(root / "clean.json")], vocab_size=400)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, d_model=32, n_head=2,
                                  positions="rope", norm="rmsnorm", activation="swiglu"))
    save_model(model, root / "model", tok)
    return root


def _cfg(base: Path, out: Path, **extra) -> MetaLoRAConfig:
    ov = {"out_dir": str(out), "base_model": str(base / "model"), "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0,
          "tasks.paths": f"[{base / 'tasks.json'}]", "tasks.heldout": "[en/rewrite]", "tasks.min_examples": 8,
          "tasks.max_len": 64, "train.meta_iters": 4, "train.tasks_per_batch": 2, "train.inner_steps": 2,
          "train.inner_lr": 0.5, "train.outer_lr": 0.5, "train.support_size": 4, "train.query_size": 4,
          "train.eval_query_size": 8, "train.eval_k": "[0, 1, 3]", "train.eval_interval": 2, "train.log_interval": 1,
          "train.checkpoint_interval": 2, **extra}
    return load_config(MetaLoRAConfig, None, [f"{k}={v}" for k, v in ov.items()])


def _lora_model(base: Path, seed: int = 0):
    from llmkit.models.io import load_model
    from llmkit.tokenizer import Tokenizer

    model = load_model(base / "model")
    torch.manual_seed(seed)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    params = lora_parameters(model)
    with torch.no_grad():  # B != 0, so A has a gradient too
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    tok = Tokenizer.load(base / "model")
    from llmkit.chat import load_chat_template

    tasks = build_tasks(MetaTasksConfig(paths=[str(base / "tasks.json")], heldout=["en/rewrite"], min_examples=8,
                                        max_len=64), tok, load_chat_template(base / "model"))
    return model, params, tasks, tok.pad_id


def _grad(model, params, batch):
    loss = model(batch[0], batch[1])[1]
    return torch.autograd.grad(loss, params)


def test_reptile_update_is_the_mean_inner_displacement(base):
    """One task, one inner step: Reptile moves phi by -eps*alpha*grad L_s(phi), the inner SGD step's direction.
    Two tasks, two steps: phi + eps * mean_T (U_2(phi) - phi), computed by hand."""
    model, params, tasks, pad = _lora_model(base)
    phi = [p.detach().clone() for p in params]
    t0, t1 = tasks.train[0].examples, tasks.train[1].examples
    s0, q0 = make_batch(t0[:4], pad), make_batch(t0[4:8], pad)
    s1, q1 = make_batch(t1[:4], pad), make_batch(t1[4:8], pad)
    alpha, eps = 0.3, 0.7
    new, _ = meta_step(model, params, phi, [(s0, q0)], "reptile", 1, alpha, eps, torch.device("cpu"))
    for p, n in zip(params, new):  # params hold the new phi
        assert torch.equal(p.detach(), n)
    g = _grad(model, _set(params, phi), s0)
    for n, v, gi in zip(new, phi, g):
        torch.testing.assert_close(n, v - eps * alpha * gi, rtol=1e-5, atol=1e-7)
        assert (n - v).abs().max() > 1e-6  # it moved

    def adapted(support):
        _set(params, phi)
        for _ in range(2):
            gs = _grad(model, params, support)
            with torch.no_grad():
                for p, gi in zip(params, gs):
                    p.sub_(alpha * gi)
        return [p.detach().clone() for p in params]

    a0, a1 = adapted(s0), adapted(s1)
    new2, figures = meta_step(model, params, phi, [(s0, q0), (s1, q1)], "reptile", 2, alpha, eps, torch.device("cpu"))
    for n, v, x, y in zip(new2, phi, a0, a1):
        torch.testing.assert_close(n, v + eps * ((x - v) + (y - v)) / 2, rtol=1e-5, atol=1e-7)
    assert np.isfinite(figures["support_loss"]) and np.isfinite(figures["query_loss"])


def _set(params, values):
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    return params


def test_fo_maml_update_is_the_query_gradient_at_the_adapted_point(base):
    model, params, tasks, pad = _lora_model(base, seed=1)
    phi = [p.detach().clone() for p in params]
    ex = tasks.train[2].examples
    support, query = make_batch(ex[:4], pad), make_batch(ex[4:8], pad)
    alpha, beta = 0.4, 0.2
    new, _ = meta_step(model, params, phi, [(support, query)], "fo-maml", 2, alpha, beta, torch.device("cpu"))
    _set(params, phi)
    for _ in range(2):
        gs = _grad(model, params, support)
        with torch.no_grad():
            for p, gi in zip(params, gs):
                p.sub_(alpha * gi)
    g_adapted = _grad(model, params, query)
    g_at_phi = _grad(model, _set(params, phi), query)
    for n, v, ga in zip(new, phi, g_adapted):
        torch.testing.assert_close(n, v - beta * ga, rtol=1e-5, atol=1e-7)
    # the adapted point's gradient is not the one at phi (so the test tells them apart)
    assert max((a - b).abs().max() for a, b in zip(g_adapted, g_at_phi)) > 1e-4


def test_adapt_and_score_k0_is_the_initialisation_and_adaptation_lowers_support_loss(base):
    model, params, tasks, pad = _lora_model(base)
    init = [p.detach().clone() for p in params]
    scores = adapt_and_score(model, params, init, tasks.heldout, [0, 3], 0.5, 4, 8, pad, torch.device("cpu"))
    assert all(torch.equal(p.detach(), v) for p, v in zip(params, init))  # left at init
    support, query = tasks.heldout[0].examples[:4], tasks.heldout[0].examples[4:12]
    x, y = make_batch(query, pad)

    def query_loss():
        with torch.no_grad():
            logits = model(x)[0]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100).item()

    assert scores["en/rewrite"][0] == pytest.approx(query_loss(), rel=1e-5)
    s_batch = make_batch(support, pad)
    for _ in range(3):  # 3 SGD steps at 0.5 on the support set, by hand
        g = _grad(model, params, s_batch)
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.sub_(0.5 * gi)
    assert scores["en/rewrite"][3] == pytest.approx(query_loss(), rel=1e-5)
    assert scores["en/rewrite"][3] < scores["en/rewrite"][0]


def test_tasks_by_language_and_category_heldout_excluded_malformed_counted(base, tmp_path):
    from llmkit.chat import load_chat_template
    from llmkit.tokenizer import Tokenizer

    assert category_of("Rewrite this sentence.") == "rewrite"
    assert category_of("Given these numbers, classify them.") == "analyze"
    assert category_of("将以下句子改写成被动语态。") == "rewrite" and language_of("将以下句子改写成被动语态。") == "zh"
    assert category_of("列出三种水果。") == "list" and category_of("Hello there") == "other"
    tok, template = Tokenizer.load(base / "model"), load_chat_template(base / "model")
    tasks = build_tasks(MetaTasksConfig(paths=[str(base / "tasks.json")], heldout=["en/rewrite"], min_examples=8,
                                        max_len=64), tok, template)
    assert sorted(t.name for t in tasks.train) == ["en/explain", "en/list", "en/write"]
    assert [t.name for t in tasks.heldout] == ["en/rewrite"] and len(tasks.heldout[0].examples) == 16
    assert tasks.summary()["malformed"] == 2
    assert {m["reason"] for m in tasks.malformed} >= {"missing 'output'", "expected a JSON object, got int"}
    # one task per file: a conversation in both a held-out and a training file is only in the held-out task
    recs = [r for r in _records() if isinstance(r, dict) and "output" in r]
    (tmp_path / "a.json").write_text(json.dumps(recs[:40]))
    (tmp_path / "b.json").write_text(json.dumps(recs[30:64]))
    by_file = build_tasks(MetaTasksConfig(paths=[str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                                          group_by="file", heldout=["b"], min_examples=8, max_len=64), tok, template)
    train_ids = {ids.tobytes() for t in by_file.train for ids, _ in t.examples}
    held_ids = {ids.tobytes() for t in by_file.heldout for ids, _ in t.examples}
    assert len(held_ids) == 34 and len(train_ids) == 30 and not train_ids & held_ids and by_file.duplicates == 10
    with pytest.raises(ValueError, match="en/nope"):
        build_tasks(MetaTasksConfig(paths=[str(base / "tasks.json")], heldout=["en/nope"]), tok, template)


def test_meta_train_writes_adapter_and_init_from_loads_it_exactly(base, tmp_path):
    from llmkit.models.io import load_model
    from llmkit.models.lora_peft import load_lora

    out = tmp_path / "meta"
    summary = meta_train_lora(_cfg(base, out))
    assert summary["step"] == 4 and (out / "final" / "adapter_config.json").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "heldout_loss_k3" in rows[0] and rows[-1]["step"] == 4
    assert set(summary["heldout_meta_init"]) == {"en/rewrite"} and summary["malformed"] == 2
    sft = load_config(SFTConfig, None, [f"base_model={base / 'model'}", "lora.r=4", "lora.alpha=8",
                                        f"lora.init_from={out}", "lora.dropout=0.0"])
    model, _, adapters = prepare_model(sft, torch.device("cpu"))
    reference = load_lora(load_model(base / "model"), out / "final")
    plain = load_model(base / "model")
    x = torch.randint(0, 300, (2, 16))
    model.eval()
    reference.eval()
    with torch.no_grad():
        got, want, base_logits = model(x)[0], reference(x)[0], plain(x)[0]
    assert torch.equal(got, want)
    assert (got - base_logits).abs().max() > 1e-4  # the adapter is not the zero one
    # the loaded A/B are the meta-learned phi of the last checkpoint, and train
    from llmkit.train.checkpoint import load_latest_checkpoint

    ck = load_latest_checkpoint(out / "checkpoints")
    named = {n: p for n, p in model.named_parameters()}
    assert all(torch.equal(named[n], t) for n, t in ck.model.items()) and all(p.requires_grad for p in adapters)


def test_init_from_mismatch_errors_name_the_mismatch(base, tmp_path):
    out = tmp_path / "meta"
    meta_train_lora(_cfg(base, out, **{"train.meta_iters": 1}))

    def prep(*ov):
        cfg = load_config(SFTConfig, None, [f"base_model={base / 'model'}", f"lora.init_from={out / 'final'}", *ov])
        return prepare_model(cfg, torch.device("cpu"))

    with pytest.raises(ValueError, match="rank 4 .* lora.r is 8"):
        prep("lora.r=8", "lora.alpha=8")
    with pytest.raises(ValueError, match=r"missing from it: \['blocks.0.attn.qkv.k"):
        prep("lora.r=4", "lora.alpha=8", "lora.targets=[q_proj, k_proj, v_proj]")
    with pytest.raises(ValueError, match=r"only in the adapter: \['blocks.0.attn.qkv.v"):
        prep("lora.r=4", "lora.alpha=8", "lora.targets=[q_proj]")
    with pytest.raises(ValueError, match="scales .* lora.alpha 32"):
        prep("lora.r=4", "lora.alpha=32")
    with pytest.raises(FileNotFoundError, match="holds no LoRA adapter"):
        prep("lora.r=4", "lora.alpha=8", f"lora.init_from={tmp_path}")
    with pytest.raises(Exception, match="init_from.*needs method: lora"):
        load_config(SFTConfig, None, [f"base_model={base / 'model'}", "method=full", f"lora.init_from={out}"])


def test_killed_run_resumes_to_the_uninterrupted_result(base, tmp_path, monkeypatch):
    straight = meta_train_lora(_cfg(base, tmp_path / "straight"))
    real_step, calls = meta_lora.meta_step, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed during meta-iteration 4: the checkpoint at 2 survives
        return real_step(*a, **k)

    monkeypatch.setattr(meta_lora, "meta_step", dying)
    with pytest.raises(KeyboardInterrupt):
        meta_train_lora(_cfg(base, tmp_path / "killed"))
    monkeypatch.setattr(meta_lora, "meta_step", real_step)
    with pytest.raises(FileExistsError, match="--resume"):
        meta_train_lora(_cfg(base, tmp_path / "killed"))
    resumed = meta_train_lora(_cfg(base, tmp_path / "killed"), resume=True)
    assert resumed["heldout_meta_init"] == straight["heldout_meta_init"]
    assert resumed["heldout_zero_init"] == straight["heldout_zero_init"]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "straight" / "metrics.jsonl").read_text() != ""
    strip = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    got = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
           for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert got == strip
    with pytest.raises(ValueError, match="algorithm differs"):
        meta_train_lora(_cfg(base, tmp_path / "killed", **{"train.algorithm": "fo-maml"}), resume=True)


def test_sigterm_writes_a_checkpoint_and_resume_finishes_like_a_straight_run(base, tmp_path):
    from conftest import sigterm_at_step

    long = {"train.meta_iters": 6, "train.checkpoint_interval": 100}
    out = tmp_path / "preempted"
    with sigterm_at_step(out / "metrics.jsonl", 2):
        stopped = meta_train_lora(_cfg(base, out, **long))
    assert stopped["stopped_by_signal"] and stopped["final"] is None and 2 <= stopped["step"] < 6
    resumed = meta_train_lora(_cfg(base, out, **long), resume=True)
    straight = meta_train_lora(_cfg(base, tmp_path / "straight", **long))
    assert resumed["step"] == 6 and resumed["heldout_meta_init"] == straight["heldout_meta_init"]


def test_cli_meta_lora_then_finetune_from_it(base, tmp_path, capsys):
    cfg = tmp_path / "meta.yaml"
    cfg.write_text(f"base_model: {base / 'model'}\nlora: {{r: 4, alpha: 8, dropout: 0.0}}\n"
                   f"tasks: {{paths: [{base / 'tasks.json'}], heldout: [en/rewrite], min_examples: 8, max_len: 64}}\n"
                   "train: {algorithm: fo-maml, meta_iters: 3, tasks_per_batch: 2, inner_steps: 1, inner_lr: 0.3,\n"
                   "        outer_lr: 0.3, support_size: 4, query_size: 4, eval_query_size: 8, eval_k: [0, 2]}\n")
    out = tmp_path / "run"
    assert main(["meta-lora", "--config", str(cfg), f"out_dir={out}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["algorithm"] == "fo-maml" and Path(summary["final"]).is_dir()
    assert main(["meta-lora", "--config", str(cfg), f"out_dir={out}", "train.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "train.bogus" in err
    sft = tmp_path / "sft.yaml"
    sft.write_text(f"task: sft\nbase_model: {base / 'model'}\nmethod: lora\nlora: {{r: 4, alpha: 8}}\n"
                   f"data: {{paths: [{base / 'tasks.json'}], mix_pretrain: 0, eval_max: 4}}\n"
                   "train: {batch_size: 2, max_steps: 2, warmup_steps: 1, eval_interval: 2, checkpoint_interval: 2,"
                   " progress: false, device: cpu}\neval: {answers: 0, samples: 0}\ntrack: {enabled: false}\n")
    assert main(["finetune", "--config", str(sft), f"out_dir={tmp_path / 'sft'}", f"lora.init_from={out}"]) == 0
    done = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert done["step"] == 2 and (tmp_path / "sft" / "final" / "adapter_config.json").is_file()
    assert main(["finetune", "--config", str(sft), f"out_dir={tmp_path / 'sft2'}", f"lora.init_from={out}",
                 "lora.r=8"]) == 2
    assert "lora.r is 8" in capsys.readouterr().err


def test_adaptation_verdict_both_ways():
    zero = [5.0, 5.1, 4.9]
    assert adaptation_verdict([4.9, 5.0, 4.8], zero)[0] == "meta-init better"
    assert adaptation_verdict([5.1, 5.2, 5.0], zero)[0] == "meta-init worse"
    assert adaptation_verdict([4.99, 5.11, 4.9], zero)[0] == "no clear difference"
    # a large mean gain carried by one seed is not a majority
    assert adaptation_verdict([4.0, 5.1, 4.9], zero)[0] == "no clear difference"
    assert adaptation_verdict([4.9, 5.0], zero[:2])[0] == "not measured"


def test_lab_claim_verdict_all_outcomes():
    from llmkit.lab.experiments.meta_lora import verdict

    zero = [5.0, 5.1, 4.9]
    better = [4.9, 5.0, 4.8]
    assert verdict(zero, better, [4.91, 5.0, 4.81])[0] == "holds"  # better than zero-init, level with joint
    assert verdict(zero, better, [4.8, 4.9, 4.7])[0] == "partly holds"  # joint training is better still
    assert verdict(zero, [5.0, 5.1, 4.9], [4.8, 4.9, 4.7])[0] == "does not hold"
    assert verdict(zero[:2], better[:2], better[:2])[0] == "not measured"


def test_config_file_matches_the_lab_settings():
    from llmkit.config import to_dict
    from llmkit.lab.experiments.meta_lora import SETTINGS

    repo = Path(__file__).resolve().parents[1]
    cfg = to_dict(load_config(MetaLoRAConfig, repo / "configs" / "meta_lora.yaml"))
    for key, value in SETTINGS.items():
        section, name = key.split(".")
        assert cfg[section][name] == value, key

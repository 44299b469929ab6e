"""Preference tuning: the losses against their closed forms, the data layouts and construction, the reference
cache, exact resume and the CLI dispatch, on a tiny decoder."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_file, sigterm_at_step
from llmkit.config import load_config
from llmkit.finetune import preference_losses as L
from llmkit.finetune.preference import PreferenceConfig, finetune_preference, preference_loss
from llmkit.finetune.preference_data import (
    PreferenceDataConfig,
    build_preference_data,
    construct_pairs,
    language,
    read_preference_file,
    truncate_answer,
)

PC, PR, RC, RR = [-12.0, -30.5, -7.25], [-15.0, -28.0, -7.0], [-13.0, -29.0, -8.0], [-14.0, -29.5, -6.0]
LC, LR = [6.0, 20.0, 3.0], [9.0, 17.0, 4.0]


def _t(*xs):
    return [torch.tensor(x, dtype=torch.float64) for x in xs]


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


# -- losses: closed forms ------------------------------------------------------------------------------
def test_dpo_and_cdpo_match_their_closed_forms():
    beta, eps = 0.3, 0.2
    got = L.dpo_loss(*_t(PC, PR, RC, RR), beta)
    smooth = L.dpo_loss(*_t(PC, PR, RC, RR), beta, label_smoothing=eps)
    for i in range(3):
        m = (PC[i] - RC[i]) - (PR[i] - RR[i])
        assert got[i].item() == pytest.approx(-math.log(_sig(beta * m)), rel=1e-12)
        assert smooth[i].item() == pytest.approx(
            -(1 - eps) * math.log(_sig(beta * m)) - eps * math.log(_sig(-beta * m)), rel=1e-12)
    with pytest.raises(ValueError):
        L.dpo_loss(*_t(PC, PR, RC, RR), beta, label_smoothing=0.5)


def test_dpo_gradient_is_the_analytic_one():
    beta = 0.5
    pc, pr, rc, rr = _t(PC, PR, RC, RR)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    L.dpo_loss(pc, pr, rc, rr, beta).sum().backward()
    m = (pc - rc) - (pr - rr)
    weight = torch.sigmoid(-beta * m.detach())
    torch.testing.assert_close(pc.grad, -beta * weight, rtol=1e-12, atol=0)
    torch.testing.assert_close(pr.grad, beta * weight, rtol=1e-12, atol=0)
    # cDPO: d/dpc = -beta [(1 - eps) sigma(-beta m) - eps sigma(beta m)]
    eps = 0.1
    pc.grad = pr.grad = None
    L.dpo_loss(pc, pr, rc, rr, beta, eps).sum().backward()
    torch.testing.assert_close(pc.grad, -beta * ((1 - eps) * weight - eps * torch.sigmoid(beta * m.detach())),
                               rtol=1e-12, atol=1e-15)


def test_ipo_matches_its_closed_form_and_gradient():
    tau = 0.25
    pc, pr, rc, rr = _t(PC, PR, RC, RR)
    pc.requires_grad_(True)
    got = L.ipo_loss(pc, pr, rc, rr, tau)
    for i in range(3):
        m = (PC[i] - RC[i]) - (PR[i] - RR[i])
        assert got[i].item() == pytest.approx((m - 1 / (2 * tau)) ** 2, rel=1e-12)
    got.sum().backward()
    m = ((pc - rc) - (pr - rr)).detach()
    torch.testing.assert_close(pc.grad, 2 * (m - 1 / (2 * tau)))


def test_orpo_matches_its_closed_form():
    lam = 0.2
    got = L.orpo_loss(*_t(PC, PR, LC, LR), lam)
    for i in range(3):
        a, b = PC[i] / LC[i], PR[i] / LR[i]
        odds = lambda lp: math.exp(lp) / (1 - math.exp(lp))  # noqa: E731
        ratio = math.log(odds(a) / odds(b))
        assert got[i].item() == pytest.approx(-a - lam * math.log(_sig(ratio)), rel=1e-10)
    # a mean log-prob near 0 (a response the model is sure of) stays finite
    assert torch.isfinite(L.orpo_loss(*_t([-1e-9], [-3.0], [5.0], [5.0]), lam)).all()


def test_simpo_matches_its_closed_form():
    beta, gamma = 2.0, 0.5
    got = L.simpo_loss(*_t(PC, PR, LC, LR), beta, gamma)
    for i in range(3):
        z = beta * PC[i] / LC[i] - beta * PR[i] / LR[i] - gamma
        assert got[i].item() == pytest.approx(-math.log(_sig(z)), rel=1e-12)


def test_kto_matches_its_closed_form_with_the_batch_kl():
    beta, ld, lu = 0.4, 1.0, 1.5
    p, r = _t(PC, RC)
    kl_p, kl_r = _t([-20.0, -10.0, -5.0], [-21.0, -11.5, -4.0])
    z0 = L.kto_reference_point(kl_p, kl_r)
    assert z0.item() == pytest.approx(max(0.0, ((1.0 + 1.5 - 1.0) / 3)))
    assert L.kto_reference_point(kl_r, kl_p).item() == 0.0  # clamped at zero
    labels = torch.tensor([True, False, True])
    got = L.kto_loss(p, r, labels, beta, z0, ld, lu)
    for i, good in enumerate([True, False, True]):
        reward = PC[i] - RC[i]
        want = ld * (1 - _sig(beta * (reward - z0.item()))) if good else lu * (1 - _sig(beta * (z0.item() - reward)))
        assert got[i].item() == pytest.approx(want, rel=1e-12)


def test_batch_statistics_for_dpo():
    cfg = PreferenceConfig(base_model="x", beta=0.5)
    logps = torch.tensor([[-1.0, -3.0], [-2.0, -1.0]])
    ref = torch.tensor([[-2.0, -2.0], [-2.0, -2.0]])
    loss, stats = preference_loss(cfg, logps, torch.ones_like(logps), ref, None)
    assert stats["rewards/chosen"] == pytest.approx(0.5 * (1.0 + 0.0) / 2)
    assert stats["rewards/rejected"] == pytest.approx(0.5 * (-1.0 + 1.0) / 2)
    assert stats["rewards/accuracy"] == 0.5 and stats["logps/accuracy"] == 0.5
    assert stats["rewards/margin"] == pytest.approx(0.5 * ((1 - -1) + (0 - 1)) / 2)
    assert loss.item() == pytest.approx((-math.log(_sig(0.5 * 2)) - math.log(_sig(0.5 * -1))) / 2)


# -- data ----------------------------------------------------------------------------------------------
def test_construct_pairs_from_instruction_data():
    from llmkit.finetune.instruction_formats import load_conversations

    convs = load_conversations(shared_file("instruct/alpaca_en_demo.json"))[0][:60]
    convs += load_conversations(shared_file("instruct/alpaca_zh_demo.json"))[0][:60]
    pairs = construct_pairs(convs, "other", seed=3)
    assert len(pairs) == 120
    lang = {c[-1]["content"]: language(c[-2]["content"] + c[-1]["content"]) for c in convs}
    assert set(lang.values()) == {"en", "zh"}
    for pair, conv in zip(pairs, convs):
        assert pair["chosen"] == conv[-1]["content"] and pair["prompt"] == conv[:-1]
        assert pair["rejected"] in lang and pair["rejected"] != pair["chosen"]
        assert lang[pair["rejected"]] == lang[pair["chosen"]]  # another answer of the same language
    assert construct_pairs(convs, "other", seed=3) == pairs and construct_pairs(convs, "other", seed=4) != pairs
    cut = construct_pairs(convs, "truncated")
    assert all(p["chosen"].startswith(p["rejected"]) and len(p["rejected"]) < len(p["chosen"]) for p in cut)
    assert truncate_answer("one two three four five six") == "one two"


def test_the_three_layouts_and_malformed_records_are_counted(tmp_path):
    f = tmp_path / "prefs.jsonl"
    rows = [
        {"prompt": "Name a colour.", "chosen": "Red.", "rejected": "Seven."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "chosen": {"role": "assistant", "content": "Hello."}, "rejected": "Go away."},
        {"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
         "rejected": {"from": "gpt", "value": "5"}},
        {"prompt": "x", "chosen": "same", "rejected": "same"},  # malformed: identical
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
         "chosen": {"from": "gpt", "value": "b"}, "rejected": {"from": "gpt", "value": "c"}},  # ends with gpt
        {"prompt": "y", "chosen": "ok"},  # no rejected
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    recs, bad, n = read_preference_file(f)
    assert n == 7 and len(recs) == 3 and len(bad) == 4
    assert recs[1].prompt[0] == {"role": "system", "content": "Be brief."} and recs[1].responses == ["Hello.", "Go away."]
    assert recs[2].prompt == [{"role": "user", "content": "2+2?"}] and recs[2].responses == ["4", "5"]
    assert all("where" in b and b["reason"] for b in bad)
    u = tmp_path / "kto.json"
    u.write_text(json.dumps([{"prompt": "a", "completion": "b", "label": True},
                             {"prompt": "a", "completion": "c", "label": "yes"}]))
    recs, bad, _ = read_preference_file(u)
    assert recs[0].label is True and len(bad) == 1 and "label" in bad[0]["reason"]


# -- the recipe on a tiny decoder ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from llmkit.models.decoder import Decoder, DecoderConfig
    from llmkit.models.io import save_model
    from llmkit.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("pref_base")
    tok = train_tokenizer([str(shared_file("instruct/alpaca_en_demo.json"))], vocab_size=600)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, d_model=32, n_head=2,
                                  positions="rope", norm="rmsnorm", activation="swiglu"))
    save_model(model, root / "model", tok)
    convs = json.loads(shared_file("instruct/alpaca_en_demo.json").read_text())[:80]
    (root / "instr.json").write_text(json.dumps(convs))
    return root


def _cfg(base: Path, out: Path, cache: Path, **extra) -> PreferenceConfig:
    overrides = {"out_dir": str(out), "base_model": str(base / "model"), "method": "lora", "loss": "dpo",
                 "reference_cache": str(cache), "data.construct_from": f"[{base / 'instr.json'}]",
                 "data.eval_max": 8, "data.eval_fraction": 0.2, "train.batch_size": 4, "train.max_steps": 6, "train.decay_steps": 6,
                 "train.warmup_steps": 1, "train.eval_interval": 3, "train.log_interval": 1,
                 "train.checkpoint_interval": 2, "train.progress": False, "train.lr": 1e-3,
                 "track.enabled": False, "lora.dropout": 0.1, "prefix.projection_dim": 16, **extra}
    return load_config(PreferenceConfig, None, [f"{k}={v}" for k, v in overrides.items()])


def _losses(summary) -> list[float]:
    return [r["loss"] for r in summary["history"] if "loss" in r]


def test_dpo_lora_trains_caches_the_reference_and_saves_an_adapter(base, tmp_path):
    cache = tmp_path / "cache"
    first = finetune_preference(_cfg(base, tmp_path / "a", cache))
    assert first["reference_computed"] and first["step"] == 6
    data = first["data"]
    assert data["paired"] and data["train"] > 0 and data["eval"] == 8 and data["malformed"] == 0
    assert data["truncated"] > 0  # block 64: long alpaca answers are cut, and counted
    # before training the LoRA policy is the reference: every implicit reward is 0
    assert first["before"]["eval_reward_chosen"] == pytest.approx(0.0, abs=1e-4)
    assert first["before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert "eval_reward_accuracy" in first["after"] and first["after"]["eval_loss"] < math.log(2)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "rewards/margin" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen", "logps/rejected", "kl"} <= \
        set(train_rows[0])
    final = Path(first["final"])
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "LORA"
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["before"] and results["after"]["eval_reward_accuracy"] == first["after"]["eval_reward_accuracy"]

    # another beta and loss over the same data and base: the cache is hit; the reference is the same file
    again = finetune_preference(_cfg(base, tmp_path / "b", cache, beta=0.5, loss="ipo"))
    assert not again["reference_computed"] and again["reference_cache"] == first["reference_cache"]
    # a changed dataset misses
    other = finetune_preference(_cfg(base, tmp_path / "c", cache, **{"data.rejected": "truncated"}))
    assert other["reference_computed"] and other["reference_cache"] != first["reference_cache"]
    assert len(list(cache.glob("reference-*.npz"))) == 2


@pytest.mark.parametrize("method", ["full", "lora", "prefix"])
def test_resume_is_exact(base, tmp_path, method):
    cache = tmp_path / "cache"
    straight = finetune_preference(_cfg(base, tmp_path / "straight", cache, method=method))
    finetune_preference(_cfg(base, tmp_path / "resumed", cache, method=method, **{"train.max_steps": 2}))
    resumed = finetune_preference(_cfg(base, tmp_path / "resumed", cache, method=method), resume=True)
    assert not resumed["reference_computed"]
    assert _losses(resumed) == _losses(straight)[2:]
    assert resumed["after"] == straight["after"]
    final = Path(straight["final"])
    if method == "full":
        assert (final / "model.safetensors").is_file()
    else:
        assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == \
            {"lora": "LORA", "prefix": "PREFIX_TUNING"}[method]


def test_sigterm_then_resume_is_bit_identical(base, tmp_path):
    cache = tmp_path / "cache"
    long = {"train.max_steps": 100_000, "train.decay_steps": 10, "train.checkpoint_interval": 1000}
    out = tmp_path / "killed"
    with sigterm_at_step(out / "metrics.jsonl", 3):
        stopped = finetune_preference(_cfg(base, out, cache, **long))
    assert stopped["stopped_by_signal"] and stopped["final"] is None
    k = stopped["step"]
    resumed = finetune_preference(_cfg(base, out, cache, **{**long, "train.max_steps": 10}), resume=True)
    reference = finetune_preference(_cfg(base, tmp_path / "ref", cache, **{**long, "train.max_steps": 10}))
    assert _losses(resumed) == _losses(reference)[k:]


@pytest.mark.parametrize("loss", ["cdpo", "orpo", "simpo"])
def test_other_paired_losses_train(base, tmp_path, loss):
    s = finetune_preference(_cfg(base, tmp_path / loss, tmp_path / "cache", loss=loss, beta=2.0 if loss == "simpo" else 0.1,
                                 **{"train.max_steps": 3}))
    assert s["step"] == 3 and all(math.isfinite(v) for v in _losses(s))
    if loss in ("orpo", "simpo"):  # reference-free: no cache file
        assert not list((tmp_path / "cache").glob("*.npz"))


def test_kto_on_unpaired_data(base, tmp_path):
    pairs = construct_pairs([c for c in _alpaca(base)], "other")
    rows = [{"prompt": p["prompt"], "completion": p["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
            for i, p in enumerate(pairs)]
    f = tmp_path / "kto.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(base, tmp_path / "kto", tmp_path / "cache", loss="kto", **{"data.construct_from": "[]",
                                                                          "data.paths": f"[{f}]"})
    s = finetune_preference(cfg)
    assert not s["data"]["paired"] and s["step"] == 6 and s["reference_computed"]
    assert "eval_kl" in s["after"] and "eval_reward_accuracy" in s["after"]
    with pytest.raises(ValueError, match="unpaired"):
        finetune_preference(_cfg(base, tmp_path / "kto2", tmp_path / "cache", loss="kto"))


def _alpaca(base):
    from llmkit.finetune.instruction_formats import load_conversations

    return load_conversations(base / "instr.json")[0]


def test_tokenized_data_scores_only_the_response(base):
    from llmkit.chat import load_chat_template
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.load(base / "model")
    template = load_chat_template(base / "model")
    data = build_preference_data(PreferenceDataConfig(construct_from=[str(base / "instr.json")], eval_fraction=0.0),
                                 tok, template, 512)
    e = data.train[0]
    (ids_c, m_c), (ids_r, m_r) = e.seqs
    first_c, first_r = int(np.argmax(m_c)), int(np.argmax(m_r))
    assert first_c == first_r and (ids_c[:first_c] == ids_r[:first_r]).all()  # same prompt, unscored
    assert tok.decode(ids_c[m_c].tolist()).startswith(_alpaca(base)[0][-1]["content"][:10])


def test_cli_dispatches_task_preference(base, tmp_path, capsys):
    from llmkit.cli import main

    recipe = tmp_path / "pref.yaml"
    recipe.write_text(f"task: preference\nbase_model: {base / 'model'}\nloss: dpo\n")
    overrides = [f"{k}={v}" for k, v in {
        "out_dir": str(tmp_path / "cli"), "data.construct_from": f"[{base / 'instr.json'}]",
        "reference_cache": str(tmp_path / "cache"), "train.max_steps": 2, "train.batch_size": 2,
        "train.progress": False, "track.enabled": False}.items()]
    assert main(["finetune", "--config", str(recipe), *overrides]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["loss"] == "dpo" and summary["step"] == 2


def test_shipped_config_loads():
    cfg = load_config(PreferenceConfig, Path(__file__).parent.parent / "configs" / "preference_dpo.yaml")
    assert cfg.task == "preference" and cfg.loss == "dpo" and cfg.method == "lora"


def test_tracked_metrics_and_dataset(base, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg = _cfg(base, tmp_path / "runs" / "pref", tmp_path / "cache", **{"track.enabled": True, "train.max_steps": 2})
    summary = finetune_preference(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(summary["tracking_run_id"])
    assert run.data.tags["llmkit.parent_model"] == str((base / "model").resolve())
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"preferences"}
    assert {"rewards_accuracy", "rewards_margin", "kl", "eval_reward_accuracy", "before_eval_reward_accuracy",
            "loss"} <= set(run.data.metrics)


def test_the_construction_command_writes_pairs_the_recipe_reads(base, tmp_path, capsys):
    from llmkit.finetune.preference_data import main as build_pairs

    out = tmp_path / "pairs.jsonl"
    build_pairs(["--from", str(base / "instr.json"), "--out", str(out), "--rejected", "mixed"])
    written = json.loads(capsys.readouterr().out)["pairs"]
    assert 75 <= written <= 80  # an answer too short to cut, or equal to the one it was paired with, is skipped
    recs, bad, n = read_preference_file(out)
    assert n == written and not bad and all(len(r.responses) == 2 for r in recs)
    cut = sum(r.responses[0].startswith(r.responses[1]) for r in recs)
    assert 0.4 * n <= cut <= 0.6 * n  # mixed: about half truncated, half another instruction's answer
    from llmkit.tokenizer import Tokenizer

    data = build_preference_data(PreferenceDataConfig(paths=[str(out)]), Tokenizer.load(base / "model"), None, 64)
    assert data.paired and len(data.train) + len(data.eval) + data.too_long == written


def test_ipo_averages_log_ratios_per_response_token_by_default():
    """TRL's IPO (and llmkit's default): the squared target applies to per-token mean log-ratios; the summed
    form stays available with ipo_per_token=false."""
    logps = torch.tensor([[-12.0, -30.0], [-40.0, -9.0]], dtype=torch.float64)
    ref = torch.tensor([[-14.0, -27.0], [-41.0, -10.0]], dtype=torch.float64)
    lens = torch.tensor([[4, 10], [16, 3]], dtype=torch.float64)
    beta = 0.2
    per_token = ((logps[:, 0] - ref[:, 0]) / lens[:, 0] - (logps[:, 1] - ref[:, 1]) / lens[:, 1] - 1 / (2 * beta)) ** 2
    summed = ((logps[:, 0] - ref[:, 0]) - (logps[:, 1] - ref[:, 1]) - 1 / (2 * beta)) ** 2
    cfg = PreferenceConfig(base_model="x", loss="ipo", beta=beta)
    got, _ = preference_loss(cfg, logps, lens, ref, None)
    assert got.item() == pytest.approx(per_token.mean().item(), rel=1e-12)
    cfg.ipo_per_token = False
    got, _ = preference_loss(cfg, logps, lens, ref, None)
    assert got.item() == pytest.approx(summed.mean().item(), rel=1e-12)

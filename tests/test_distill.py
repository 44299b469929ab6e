"""Knowledge distillation: the divergences against closed forms, the pruned student (depth, and width by
activation importance), the teacher cache, the recipe end to end (KD moves the student toward the teacher,
exact resume, LoRA students, refusals), on-policy batches (the student's own samples, scored live), the CLI."""

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from conftest import shared_file, sigterm_at_step
from llmkit.cli import main
from llmkit.config import load_config
from llmkit.distill.losses import kd_divergence
from llmkit.distill.recipe import DistillConfig, distill
from llmkit.distill.student import (
    drop_layers,
    example_batches,
    kept_layers,
    prune_width,
    smaller_config,
    width_importance,
)
from llmkit.models.decoder import Decoder, DecoderConfig


# -- the divergences ------------------------------------------------------------------------------------
def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def test_forward_kl_is_the_closed_form_with_the_student_normalised_over_the_whole_vocabulary():
    student = torch.tensor([[1.0, 0.5, -1.0, 2.0, 0.0]])
    ids, values = torch.tensor([[3, 0]]), torch.tensor([[3.0, 1.0]])
    T = 2.0
    p = _softmax([3.0, 1.0], T)
    q_full = _softmax(student[0].tolist(), T)
    want = _kl(p, [q_full[3], q_full[0]]) * T * T
    got = kd_divergence(student, ids, values, "forward_kl", T)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_reverse_kl_and_jsd_are_the_closed_forms_on_the_top_k_support():
    student = torch.tensor([[0.2, 1.5, -0.3], [2.0, -1.0, 0.1]])
    ids = torch.tensor([[1, 0], [2, 0]])
    values = torch.tensor([[2.0, 0.5], [1.0, 1.0]])
    rkl, jsd = [], []
    beta = 0.3
    for r in range(2):
        p = _softmax(values[r].tolist())
        q = _softmax([student[r, i].item() for i in ids[r]])
        rkl.append(_kl(q, p))
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
        jsd.append(beta * _kl(p, m) + (1 - beta) * _kl(q, m))
    assert kd_divergence(student, ids, values, "reverse_kl").item() == pytest.approx(sum(rkl) / 2, rel=1e-5)
    assert kd_divergence(student, ids, values, "jsd", beta=beta).item() == pytest.approx(sum(jsd) / 2, rel=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_is_zero_when_the_student_is_the_teacher_and_positive_otherwise(kind):
    torch.manual_seed(0)
    logits = torch.randn(6, 20)
    top = logits.topk(20, dim=-1)  # the whole vocabulary: no tail dropped
    same = kd_divergence(logits, top.indices, top.values, kind, 1.5)
    other = kd_divergence(torch.randn(6, 20), top.indices, top.values, kind, 1.5)
    assert abs(same.item()) < 1e-5 and other.item() > 1e-3


def test_forward_kl_gradient_pulls_the_student_toward_the_teacher():
    student = torch.zeros(1, 4, requires_grad=True)
    kd_divergence(student, torch.tensor([[2, 1]]), torch.tensor([[4.0, 0.0]]), "forward_kl").backward()
    assert student.grad[0, 2] < 0 < student.grad[0, 0]  # raise the teacher's favourite, lower a tail token


def test_bad_settings_are_named():
    s, ids, v = torch.randn(2, 5), torch.tensor([[0, 1]] * 2), torch.randn(2, 2)
    with pytest.raises(ValueError, match="temperature"):
        kd_divergence(s, ids, v, temperature=0)
    with pytest.raises(ValueError, match="beta"):
        kd_divergence(s, ids, v, "jsd", beta=1.0)
    with pytest.raises(ValueError, match="kind"):
        kd_divergence(s, ids, v, "l2")


# -- the student ------------------------------------------------------------------------------------------
def _llama(n_layer=6, vocab=64, seed=0):
    torch.manual_seed(seed)
    return Decoder(DecoderConfig(vocab_size=vocab, block_size=32, n_layer=n_layer, d_model=32, n_head=4,
                                 n_kv_head=2, positions="rope", norm="rmsnorm", activation="swiglu")).eval()


def test_kept_layers_are_evenly_spaced_with_first_and_last():
    assert kept_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert kept_layers(6, 3) == [0, 2, 5] or kept_layers(6, 3) == [0, 3, 5]
    assert kept_layers(6, 1) == [0] and kept_layers(6, 6) == list(range(6))
    with pytest.raises(ValueError, match="keep_layers"):
        kept_layers(6, 7)
    with pytest.raises(ValueError, match="keep_layers"):
        kept_layers(6, [3, 1])


def test_a_layer_dropped_student_holds_the_teachers_weights_and_equals_it_when_all_are_kept():
    teacher = _llama()
    student = drop_layers(teacher, [0, 2, 5])
    assert student.config.n_layer == 3
    assert torch.equal(student.blocks[1].attn.qkv.weight, teacher.blocks[2].attn.qkv.weight)
    assert torch.equal(student.blocks[2].mlp.down.weight, teacher.blocks[5].mlp.down.weight)
    idx = torch.randint(0, 64, (2, 10))
    assert torch.equal(drop_layers(teacher, 6)(idx)[0], teacher(idx)[0])
    assert not torch.allclose(student(idx)[0], teacher(idx)[0])


def _calib(model, n=4, T=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, model.config.vocab_size, (n, T), generator=g)
    return [(x, torch.ones_like(x, dtype=torch.bool))]


@pytest.mark.parametrize("arch", [
    {"n_kv_head": 2, "positions": "rope", "norm": "rmsnorm", "activation": "swiglu"},  # Llama, GQA
    {"positions": "learned", "activation": "gelu", "bias": True},  # GPT-2, multi-head, biases
    {"n_kv_head": 1, "positions": "rope", "norm": "rmsnorm", "activation": "geglu_tanh", "qkv_bias": True,
     "qk_norm": True, "post_norms": True},  # MQA, q/k/v biases and norms
])
def test_width_pruning_that_keeps_everything_is_the_teacher_exactly(arch):
    torch.manual_seed(0)
    teacher = Decoder(DecoderConfig(vocab_size=64, block_size=32, n_layer=3, d_model=32, n_head=4, **arch)).eval()
    student = prune_width(teacher, width_importance(teacher, _calib(teacher)), 1.0, 1.0)
    idx = torch.randint(0, 64, (2, 12))
    assert torch.equal(student(idx)[0], teacher(idx)[0])
    smaller = prune_width(teacher, width_importance(teacher, _calib(teacher)), 0.5, 0.5)
    assert not torch.allclose(smaller(idx)[0], teacher(idx)[0])


def test_width_pruning_keeps_the_most_active_neurons_and_kv_groups_with_the_expected_shapes(tmp_path):
    from llmkit.models.io import load_model, save_model

    teacher = _llama(n_layer=2)  # 4 query heads in 2 key/value groups, head_dim 8, d_ff 128
    importance = width_importance(teacher, _calib(teacher))
    student = prune_width(teacher, importance, 0.25, 0.5)
    c = student.config
    assert (c.n_head, c.n_kv_head, c.head_dim, c.d_ff, c.n_layer, c.d_model) == (2, 1, 8, 32, 2, 32)
    per_layer = lambda d_ff, n_head, n_kv: 3 * 32 * d_ff + 32 * 8 * (n_head + 2 * n_kv) + 8 * n_head * 32  # noqa: E731
    removed = 2 * (per_layer(128, 4, 2) - per_layer(32, 2, 1))
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in teacher.parameters()) - removed
    for i in range(2):
        t, s = teacher.blocks[i], student.blocks[i]
        neurons = sorted(importance[i]["mlp"].argsort(descending=True)[:32].tolist())
        assert torch.equal(s.mlp.gate.weight, t.mlp.gate.weight[neurons])
        assert torch.equal(s.mlp.up.weight, t.mlp.up.weight[neurons])
        assert torch.equal(s.mlp.down.weight, t.mlp.down.weight[:, neurons])
        g = int(importance[i]["heads"].view(2, 2).sum(1).argmax())  # the kept group: its 2 query heads, its k, v
        q, k, v = t.attn.qkv.weight.split((32, 16, 16))
        assert torch.equal(s.attn.qkv.weight, torch.cat((q[16 * g:16 * g + 16], k[8 * g:8 * g + 8], v[8 * g:8 * g + 8])))
        assert torch.equal(s.attn.proj.weight, t.attn.proj.weight[:, 16 * g:16 * g + 16])
        assert torch.equal(s.norm1.weight, t.norm1.weight)
    loaded = load_model(save_model(student, tmp_path / "pruned"))  # head_dim is written: 8, not d_model / n_head
    idx = torch.randint(0, 64, (2, 12))
    assert loaded.config.head_dim == 8 and torch.equal(loaded(idx)[0], student(idx)[0])


def test_width_importance_counts_real_tokens_only_and_composes_with_dropped_layers():
    teacher = _llama(n_layer=4)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 64, (1, 10), generator=g), torch.randint(0, 64, (1, 6), generator=g)
    padded = torch.cat((a, torch.cat((b, torch.zeros(1, 4, dtype=torch.long)), 1)))
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 6:] = False
    together = width_importance(teacher, [(padded, valid)])
    alone = [width_importance(teacher, [(r, torch.ones_like(r, dtype=torch.bool))]) for r in (a, b)]
    for i in range(4):
        for unit in ("mlp", "heads"):  # token-weighted means of each row's: the padding is not counted
            want = (10 * alone[0][i][unit] + 6 * alone[1][i][unit]) / 16
            assert torch.allclose(together[i][unit], want, rtol=1e-6, atol=1e-9)
    # depth then width (the recipe's order) equals width then depth
    layers = [0, 3]
    one = prune_width(drop_layers(teacher, layers), [together[i] for i in layers], 0.5, 0.5)
    two = drop_layers(prune_width(teacher, together, 0.5, 0.5), layers)
    assert all(torch.equal(one.state_dict()[k], v) for k, v in two.state_dict().items())


def test_width_pruning_by_activation_beats_a_random_slice_on_held_out_data(teacher_dir):
    """The MLP-pruned student's distribution is closer to the teacher's than that of students sliced at random
    to the same size, on held-out examples (the importance is measured on training ones). On this teacher the
    KL is ~0.001 against 0.04-0.13 for random slices, and 0.66 keeping the least active half."""
    from llmkit.chat import load_chat_template
    from llmkit.finetune.sft_data import InstructDataConfig, build_sft_data
    from llmkit.models.io import load_model
    from llmkit.tokenizer import Tokenizer

    teacher = load_model(teacher_dir).eval()
    tok = Tokenizer.load(teacher_dir)
    data = build_sft_data(InstructDataConfig(paths=[str(shared_file("instruct/alpaca_en_demo.json"))], eval_max=16,
                                             max_len=96, mix_pretrain=0.0), tok, load_chat_template(teacher_dir), 96)
    importance = width_importance(teacher, example_batches(data.train[:32], 8, data.pad_id))
    held_out = example_batches(data.eval, 8, data.pad_id)

    @torch.no_grad()
    def kl_to_teacher(student) -> float:
        total = n = 0.0
        for x, valid in held_out:
            p = torch.log_softmax(teacher(x)[0][valid], -1)
            q = torch.log_softmax(student(x)[0][valid], -1)
            total += (p.exp() * (p - q)).sum().item()
            n += valid.sum().item()
        return total / n

    pruned = kl_to_teacher(prune_width(teacher, importance, 0.5))
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        noise = [{k: torch.rand(v.shape, generator=g, dtype=v.dtype) for k, v in layer.items()} for layer in importance]
        assert pruned < kl_to_teacher(prune_width(teacher, noise, 0.5))


def test_width_pruning_drops_the_heads_that_contribute_nothing():
    """Key/value group 1 of every layer is silenced (its value rows zeroed): its heads rank last, and pruning
    half the heads gives exactly the teacher's logits, while keeping group 1 does not."""
    teacher = _llama(n_layer=3)  # head_dim 8, 4 query heads over 2 key/value groups: q 32 rows, k 16, v 16
    with torch.no_grad():
        for block in teacher.blocks:
            block.attn.qkv.weight[32 + 16 + 8:] = 0.0  # v of group 1
    importance = width_importance(teacher, _calib(teacher))
    assert all(layer["heads"][2:].max() == 0 < layer["heads"][:2].min() for layer in importance)
    idx = torch.randint(0, 64, (2, 12))
    pruned = prune_width(teacher, importance, 1.0, 0.5)
    assert pruned.config.n_head == 2 and torch.allclose(pruned(idx)[0], teacher(idx)[0], atol=1e-6)
    wrong = [{**layer, "heads": -layer["heads"]} for layer in importance]
    assert not torch.allclose(prune_width(teacher, wrong, 1.0, 0.5)(idx)[0], teacher(idx)[0], atol=1e-3)


def test_a_smaller_config_keeps_the_vocabulary_and_names_unknown_fields():
    student = smaller_config(_llama(), {"n_layer": 2, "d_model": 16, "n_head": 2, "n_kv_head": 1})
    assert student.config.vocab_size == 64 and student.config.head_dim == 8 and student.config.n_layer == 2
    with pytest.raises(ValueError, match="n_layers"):
        smaller_config(_llama(), {"n_layers": 2})


# -- the recipe ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    """A small decoder first trained on the instructions, so its distributions say something a student can learn."""
    from llmkit.finetune.sft import SFTConfig, finetune_sft
    from llmkit.models.io import save_model
    from llmkit.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("teacher")
    tok = train_tokenizer([str(shared_file("instruct/alpaca_en_demo.json"))], vocab_size=600)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size + 8, block_size=96, n_layer=4, d_model=48, n_head=4,
                                  n_kv_head=2, positions="rope", norm="rmsnorm", activation="swiglu"))
    save_model(model, root / "init", tok)  # 8 padded vocabulary rows past the tokenizer's
    sft = load_config(SFTConfig, None, [
        f"out_dir={root / 'sft'}", f"base_model={root / 'init'}", "method=full",
        f"data.paths=[{shared_file('instruct/alpaca_en_demo.json')}]", "data.mix_pretrain=0", "data.eval_max=16",
        "data.max_len=96", "train.batch_size=8", "train.max_steps=300", "train.lr=3e-3", "train.warmup_steps=10",
        "train.eval_interval=300", "train.progress=false", "eval.answers=0", "eval.samples=0", "track.enabled=false"])
    finetune_sft(sft)
    return root / "sft" / "final"


def _cfg(teacher: Path, out: Path, cache: Path, **extra) -> DistillConfig:
    overrides = {
        "out_dir": str(out), "teacher": str(teacher), "student.keep_layers": 2, "teacher_cache": str(cache),
        "data.paths": f"[{shared_file('instruct/alpaca_en_demo.json')}]", "data.eval_max": 16, "data.max_len": 96,
        "loss.top_k": 16, "train.batch_size": 8, "train.max_steps": 20, "train.lr": 3e-3, "train.warmup_steps": 2,
        "train.eval_interval": 20, "train.log_interval": 1, "train.checkpoint_interval": 10,
        "train.progress": False, "eval.answers": 2, "eval.samples": 0, "eval.max_new_tokens": 8,
        "track.enabled": False, **extra}
    return load_config(DistillConfig, None, [f"{k}={v}" for k, v in overrides.items()])


def test_distillation_brings_the_student_closer_to_the_teacher_than_hard_labels(teacher_dir, tmp_path):
    cache = tmp_path / "cache"
    kd = distill(_cfg(teacher_dir, tmp_path / "kd", cache, **{"loss.alpha": 1.0, "loss.temperature": 1.0}))
    hard = distill(_cfg(teacher_dir, tmp_path / "hard", cache, **{"loss.alpha": 0.0}))
    assert kd["teacher_outputs_computed"] and not hard["teacher_outputs_computed"]  # the second run read the cache
    assert kd["eval_kl_to_teacher"] < hard["eval_kl_to_teacher"]
    results = json.loads((tmp_path / "kd" / "results.json").read_text())
    assert results["student"]["params"] < results["teacher"]["params"] and 0 < results["size_ratio"] < 1
    assert results["teacher"]["eval_top1_agreement"] == 1.0  # the teacher agrees with its own cached outputs
    assert kd["eval_top1_agreement"] > hard["eval_top1_agreement"]
    from llmkit.models.io import load_model
    assert load_model(tmp_path / "kd" / "final").config.n_layer == 2


def test_teacher_outputs_are_keyed_by_content(teacher_dir, tmp_path):
    """Another top_k or other data is another file; the same ones are read, not recomputed."""
    cache = tmp_path / "cache"
    short = {"train.max_steps": 1, "train.eval_interval": 1, "eval.answers": 0}
    assert distill(_cfg(teacher_dir, tmp_path / "a", cache, **short))["teacher_outputs_computed"]
    assert not distill(_cfg(teacher_dir, tmp_path / "b", cache, **short))["teacher_outputs_computed"]
    assert distill(_cfg(teacher_dir, tmp_path / "c", cache, **{**short, "loss.top_k": 8}))["teacher_outputs_computed"]
    assert distill(_cfg(teacher_dir, tmp_path / "d", cache, **{**short, "data.eval_max": 12}))[
        "teacher_outputs_computed"]
    assert len(list(cache.glob("teacher-*.npz"))) == 6  # train + eval for each of three contents


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sigterm_then_resume_equals_an_uninterrupted_run(teacher_dir, tmp_path, method):
    cache = tmp_path / "cache"
    long = {"method": method, "loss.kind": "jsd", "train.max_steps": 100_000, "train.decay_steps": 10,
            "train.checkpoint_interval": 1000, "eval.answers": 0}
    out = tmp_path / "stopped"
    with sigterm_at_step(out / "metrics.jsonl", 3):
        stopped = distill(_cfg(teacher_dir, out, cache, **long))
    assert stopped["stopped_by_signal"] and stopped["final"] is None
    resumed = distill(_cfg(teacher_dir, out, cache, **{**long, "train.max_steps": 10}), resume=True)
    reference = distill(_cfg(teacher_dir, tmp_path / "ref", cache, **{**long, "train.max_steps": 10}))
    losses = lambda h: [r["loss"] for r in h if "loss" in r and r["step"] > stopped["step"]]  # noqa: E731
    assert losses(resumed["history"]) == losses(reference["history"])
    assert resumed["eval_loss"] == reference["eval_loss"]
    if method == "lora":  # the adapter loads onto the saved pruned student
        from llmkit.models.adapters import adapter_base_model, load_adapter
        from llmkit.models.io import load_model
        assert Path(adapter_base_model(out / "final")) == (out / "student_init").resolve()
        load_adapter(load_model(out / "student_init"), out / "final")


def test_a_student_with_another_tokenizer_is_refused_with_the_reason(teacher_dir, tmp_path):
    from llmkit.models.io import save_model
    from llmkit.tokenizer import train_tokenizer

    tok = train_tokenizer([str(shared_file("instruct/alpaca_en_demo.json"))], vocab_size=400)
    other = save_model(Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=1, d_model=16,
                                             n_head=2)), tmp_path / "other", tok)
    cfg = _cfg(teacher_dir, tmp_path / "x", tmp_path / "cache", **{"student.keep_layers": "null",
                                                                     "student.model": str(other)})
    with pytest.raises(ValueError, match="another tokenizer"):
        distill(cfg)


def test_exactly_one_kind_of_student_and_wrong_keys_are_named(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        _cfg(teacher_dir, tmp_path / "x", tmp_path / "c", **{"student.model": "somewhere"})
    with pytest.raises(ValueError, match="temperatur"):
        _cfg(teacher_dir, tmp_path / "x", tmp_path / "c", **{"loss.temperatur": 2})


def test_cli_distill_with_a_smaller_config_student(teacher_dir, tmp_path, capsys):
    cfg = tmp_path / "distill.yaml"
    cfg.write_text(f"""
task: distill
out_dir: {tmp_path / 'cli'}
teacher: {teacher_dir}
teacher_cache: {tmp_path / 'cache'}
student:
  config: {{n_layer: 1, d_model: 32, n_head: 2, n_kv_head: 1}}
loss: {{kind: reverse_kl, top_k: 8}}
data: {{paths: [{shared_file('instruct/alpaca_en_demo.json')}], eval_max: 8, max_len: 96}}
train: {{batch_size: 4, max_steps: 3, eval_interval: 3, warmup_steps: 1, progress: false}}
eval: {{answers: 1, samples: 0, max_new_tokens: 4}}
track: {{enabled: false}}
""")
    main(["distill", "--config", str(cfg)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["loss"] == "reverse_kl" and summary["student_params"] < summary[
        "teacher_params"]
    assert (tmp_path / "cli" / "final" / "model.safetensors").is_file()


def test_sequence_level_trains_on_the_teachers_own_answers_generated_once(teacher_dir, tmp_path):
    """The training conversations end with the teacher's greedy answers (the held-out ones keep their
    references); a second run reads the answers from the cache."""
    from llmkit.chat import load_chat_template
    from llmkit.distill.sequence_level import teacher_answers
    from llmkit.finetune.sft_data import build_sft_data
    from llmkit.infer.generate import SamplingParams
    from llmkit.infer.reply import chat_reply
    from llmkit.models.io import load_model
    from llmkit.tokenizer import Tokenizer

    cache = tmp_path / "cache"
    seq = {"sequence_level": True, "answer_max_new_tokens": 12, "loss.alpha": 0.0, "train.max_steps": 2,
           "train.eval_interval": 2, "eval.answers": 0}
    first = distill(_cfg(teacher_dir, tmp_path / "a", cache, **seq))
    second = distill(_cfg(teacher_dir, tmp_path / "b", cache, **seq))
    assert first["teacher_answers_computed"] and second["teacher_answers_computed"] is False
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["sequence_level"]["answers_computed"]
    # the cached answers are what the teacher says to those prompts, greedily
    cfg = _cfg(teacher_dir, tmp_path / "c", cache, **seq)
    tok, template = Tokenizer.load(teacher_dir), load_chat_template(teacher_dir)
    teacher = load_model(teacher_dir)
    data = build_sft_data(cfg.data, tok, template, 96)
    answers, computed = teacher_answers(teacher, "unused-digest", data, tok, 12, tmp_path / "other")
    assert computed and len(answers) == len(data.train)
    for ex, answer in list(zip(data.train, answers))[:3]:
        assert answer == chat_reply(teacher, tok, template, ex.messages[:-1],
                                    SamplingParams(max_new_tokens=12, temperature=0.0))
    from llmkit.distill.sequence_level import with_teacher_answers

    answers[0] = "   "  # an empty answer is dropped and counted, not trained on
    replaced, dropped = with_teacher_answers(data, answers, tok)
    assert dropped >= 1 and replaced.eval == data.eval and replaced.digest != data.digest
    assert replaced.train[0].messages[:-1] == data.train[1].messages[:-1]
    assert replaced.train[0].messages[-1]["content"] == answers[1]


# -- on-policy distillation ----------------------------------------------------------------------------------
def test_on_policy_batches_are_an_exact_evenly_spread_share():
    from llmkit.distill.on_policy import is_on_policy

    for f in ("0", "0.1", "0.25", "0.3", "0.5", "0.9", "1"):  # after k batches exactly floor(k f) were on-policy
        on = [is_on_policy(k, float(f)) for k in range(1000)]
        assert all(sum(on[:k]) == math.floor(k * Fraction(f)) for k in (7, 40, 333, 1000))
    assert [is_on_policy(k, 0.5) for k in range(4)] == [False, True, False, True]


def test_an_on_policy_batch_holds_the_students_samples_and_its_loss_is_the_divergence_by_hand(teacher_dir):
    """The replies are what the student samples for those prompts with the row's seed (checked against the
    single-prompt sampler `stream_tokens`), differ from the references, and the batch's loss is kd_divergence
    of the student's logits against the teacher's top-k logits, recomputed here, at the reply's positions."""
    from llmkit.chat import load_chat_template
    from llmkit.distill.on_policy import OnPolicyConfig, on_policy_batch, reply_prompts, sample_seed, stop_ids
    from llmkit.distill.recipe import KDLossConfig, on_policy_loss
    from llmkit.finetune.sft_data import InstructDataConfig, build_sft_data
    from llmkit.infer.generate import SamplingParams, stream_tokens
    from llmkit.models.io import load_model
    from llmkit.tokenizer import Tokenizer

    teacher = load_model(teacher_dir).eval()
    tok, template = Tokenizer.load(teacher_dir), load_chat_template(teacher_dir)
    data = build_sft_data(InstructDataConfig(paths=[str(shared_file("instruct/alpaca_en_demo.json"))], eval_max=16,
                                             max_len=96, mix_pretrain=0.0), tok, template, 96)
    student = drop_layers(teacher, 2).train()
    examples = data.train[:6]
    prompts = reply_prompts(examples, tok, template)
    stops = stop_ids(tok, template)
    cfg = OnPolicyConfig(fraction=1.0, max_new_tokens=12, temperature=1.0)
    b = on_policy_batch(student, teacher, examples, prompts, cfg, tokenizer=tok, stops=stops, max_len=96,
                        pad_id=data.pad_id, vocab=tok.vocab_size, top_k=16, seed=5, batch_index=7, device="cpu")
    assert student.training  # sampling put it in eval mode and back
    assert b["on_policy"] and b["new_tokens"] == sum(len(r) for r in b["replies"])
    differ = 0
    for r, (ex, prompt, reply) in enumerate(zip(examples, prompts, b["replies"])):
        assert prompt is not None and reply is not None and ex.ids[:len(prompt)].tolist() == prompt
        budget = min(12, 96 - len(prompt))
        free = list(stream_tokens(student.eval(), prompt, SamplingParams(
            max_new_tokens=budget, temperature=1.0, top_p=None, seed=sample_seed(5, 7, r), stop_at_eos=False),
            vocab_limit=tok.vocab_size))
        student.train()
        ended = [j for j, t in enumerate(free) if t in stops]
        assert reply == (free[:ended[0] + 1] if ended else free)  # the student's draws, the stop id kept
        differ += reply != ex.ids[len(prompt):].tolist()
        n = len(prompt) + len(reply) - 1
        assert b["x"][r, :n].tolist() == (prompt + reply)[:-1]
        assert b["y"][r, len(prompt) - 1:n].tolist() == reply and (b["y"][r, :len(prompt) - 1] == -100).all()
    assert differ == len(examples)
    # the loss by hand
    loss_cfg = KDLossConfig(kind="jsd", temperature=1.5, beta=0.3)
    logits = student(b["x"])[0]
    with torch.no_grad():
        t_logits = teacher(b["x"])[0][..., :tok.vocab_size]
    sel_s, sel_t = [], []
    for r, (prompt, reply) in enumerate(zip(prompts, b["replies"])):
        at = list(range(len(prompt) - 1, len(prompt) - 1 + len(reply)))
        sel_s.append(logits[r, at])
        sel_t.append(t_logits[r, at])
    top = torch.cat(sel_t).topk(16, dim=-1)
    assert torch.equal(b["ids"], top.indices) and torch.equal(b["values"], top.values)
    want = kd_divergence(torch.cat(sel_s), top.indices, top.values, "jsd", 1.5, 0.3)
    got = on_policy_loss(logits, b["y"], b["ids"], b["values"], loss_cfg)
    assert got.item() == pytest.approx(want.item(), rel=1e-6) and got.requires_grad
    # another seed or batch index samples other replies
    other = on_policy_batch(student, teacher, examples, prompts, cfg, tokenizer=tok, stops=stops, max_len=96,
                            pad_id=data.pad_id, vocab=tok.vocab_size, top_k=16, seed=5, batch_index=8, device="cpu")
    assert other["replies"] != b["replies"]


def test_on_policy_distillation_logs_its_share_records_samples_and_resumes_exactly(teacher_dir, tmp_path):
    """Every other batch is the student's own replies: the logged share is 1/2, the sampled replies are in
    results.json and differ from the references, and a run killed mid-way and resumed samples and trains
    exactly as an uninterrupted one (the losses, held-out figures and tallies are equal)."""
    cache = tmp_path / "cache"
    long = {"on_policy.fraction": 0.5, "on_policy.max_new_tokens": 8, "loss.kind": "reverse_kl",
            "train.max_steps": 100_000, "train.decay_steps": 10, "train.checkpoint_interval": 1000,
            "train.eval_interval": 5, "eval.answers": 0}
    out = tmp_path / "stopped"
    with sigterm_at_step(out / "metrics.jsonl", 3):
        stopped = distill(_cfg(teacher_dir, out, cache, **long))
    assert stopped["stopped_by_signal"]
    resumed = distill(_cfg(teacher_dir, out, cache, **{**long, "train.max_steps": 10}), resume=True)
    reference = distill(_cfg(teacher_dir, tmp_path / "ref", cache, **{**long, "train.max_steps": 10}))
    after = lambda h, key: [r[key] for r in h if key in r and r["step"] > stopped["step"]]  # noqa: E731
    assert after(resumed["history"], "loss") == after(reference["history"], "loss")
    assert resumed["eval_loss"] == reference["eval_loss"]
    assert resumed["on_policy_share"] == reference["on_policy_share"] == 0.5
    assert resumed["on_policy_new_tokens"] == reference["on_policy_new_tokens"] > 0
    rows = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["on_policy_share"] for r in rows if "on_policy_share" in r] == [2 / 5, 5 / 10]  # batches 1, 3, 5, ...
    results = json.loads((tmp_path / "ref" / "results.json").read_text())
    on = results["on_policy"]
    assert on["batches"] == 5 and on["fraction"] == 0.5 and on["sampled_rows"] == 5 * 8
    assert on["samples"] and all(1 <= len(s["reply_ids"]) <= 8 and s["reply"] != s["reference"] for s in on["samples"])
    assert json.loads((out / "results.json").read_text())["on_policy"]["samples"] == on["samples"]
    # without on-policy batches: the same first step (an off-policy batch), another second one
    off = distill(_cfg(teacher_dir, tmp_path / "off", cache, **{**long, "train.max_steps": 2,
                                                                   "on_policy.fraction": 0.0}))
    loss_at = lambda h, step: next(r["loss"] for r in h if r["step"] == step and "loss" in r)  # noqa: E731
    assert off["on_policy_share"] is None and loss_at(off["history"], 1) == loss_at(reference["history"], 1)
    assert loss_at(off["history"], 2) != loss_at(reference["history"], 2)


def test_width_and_depth_pruned_student_through_the_cli_trains_and_loads(teacher_dir, tmp_path, capsys):
    from llmkit.models.io import load_model

    cfg = tmp_path / "distill.yaml"
    cfg.write_text(f"""
task: distill
out_dir: {tmp_path / 'cli'}
teacher: {teacher_dir}
teacher_cache: {tmp_path / 'cache'}
student:
  keep_layers: 3
  prune_width: {{mlp_hidden: 0.5, heads: 0.5, calibration_batches: 2}}
on_policy: {{fraction: 0.5, max_new_tokens: 4}}
loss: {{kind: forward_kl, top_k: 8}}
data: {{paths: [{shared_file('instruct/alpaca_en_demo.json')}], eval_max: 8, max_len: 96}}
train: {{batch_size: 8, max_steps: 2, eval_interval: 2, warmup_steps: 1, progress: false}}
eval: {{answers: 0, samples: 0}}
track: {{enabled: false}}
""")
    main(["distill", "--config", str(cfg)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["on_policy_share"] == 0.5
    teacher = load_model(teacher_dir)
    student = load_model(tmp_path / "cli" / "final")
    c, t = student.config, teacher.config
    assert (c.n_layer, c.d_ff, c.n_head, c.n_kv_head, c.head_dim) == (3, t.d_ff // 2, 2, 1, t.head_dim)
    assert c.d_model == t.d_model and summary["student_params"] == sum(p.numel() for p in student.parameters())
    results = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert results["student_init"]["prune_width"]["mlp_hidden"] == 0.5 and results["student_init"]["d_ff"] == c.d_ff


def test_bad_on_policy_and_prune_width_settings_are_named(tmp_path):
    def cfg(**extra):
        return _cfg(tmp_path / "teacher", tmp_path / "x", tmp_path / "c", **extra)

    for key, value, match in [("on_policy.fractoin", 0.5, "on_policy.fractoin"),
                              ("on_policy.fraction", 1.5, "on_policy.fraction"),
                              ("on_policy.max_new_tokens", 0, "on_policy.max_new_tokens"),
                              ("student.prune_width.mlp_hiden", 0.5, "student.prune_width.mlp_hiden"),
                              ("student.prune_width.heads", 0, "student.prune_width.heads"),
                              ("student.prune_width.calibration_batches", 0, "calibration_batches")]:
        with pytest.raises(ValueError, match=match):
            cfg(**{key: value})
    with pytest.raises(ValueError, match="on_policy.fraction.*alpha"):
        cfg(**{"on_policy.fraction": 0.5, "loss.alpha": 0.0})
    with pytest.raises(ValueError, match="on_policy.fraction.*mix_pretrain"):
        cfg(**{"on_policy.fraction": 0.5, "data.mix_pretrain": 0.1, "data.pretrain": "x.txt"})
    with pytest.raises(ValueError, match="prune_width.*config"):
        cfg(**{"student.keep_layers": "null", "student.config": "{n_layer: 1}", "student.prune_width.heads": 0.5})
    assert cfg(**{"student.keep_layers": "null", "student.prune_width.mlp_hidden": 0.5}).student.keep_layers is None

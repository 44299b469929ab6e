"""Knowledge distillation: the divergences against closed forms, the pruned student, the teacher cache, the
recipe end to end (KD moves the student toward the teacher, exact resume, LoRA students, refusals), the CLI."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import shared_file, sigterm_at_step
from llmkit.cli import main
from llmkit.config import load_config
from llmkit.distill.losses import kd_divergence
from llmkit.distill.recipe import DistillConfig, distill
from llmkit.distill.student import drop_layers, kept_layers, smaller_config
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

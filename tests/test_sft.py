"""Instruction tuning end to end: full / LoRA / prefix on a tiny decoder, exact resume, merge, generate."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import shared_file, sigterm_at_step
from llmkit.cli import main
from llmkit.config import load_config
from llmkit.finetune.sft import SFTConfig, finetune_sft


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny Llama-style decoder with a BPE tokenizer that has the chat tokens, saved as a model dir."""
    from llmkit.models.decoder import Decoder, DecoderConfig
    from llmkit.models.io import save_model
    from llmkit.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("base")
    tok = train_tokenizer([str(shared_file("instruct/alpaca_en_demo.json"))], vocab_size=600)
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, d_model=32, n_head=2,
                                  positions="rope", norm="rmsnorm", activation="swiglu"))
    save_model(model, root / "model", tok)
    (root / "pretrain.txt").write_text(shared_file("en/wiki_demo.txt").read_text()[:100_000])
    return root


def _cfg(base: Path, out: Path, method: str, **extra) -> SFTConfig:
    overrides = {
        "out_dir": str(out), "base_model": str(base / "model"), "method": method,
        "data.paths": f"[{shared_file('instruct/alpaca_en_demo.json')}]", "data.eval_max": 8,
        "data.pretrain": str(base / "pretrain.txt"), "data.mix_pretrain": 0.25,
        "train.batch_size": 4, "train.max_steps": 6, "train.decay_steps": 6, "train.warmup_steps": 1, "train.eval_interval": 3,
        "train.log_interval": 1, "train.checkpoint_interval": 2, "train.progress": False,
        "eval.answers": 2, "eval.samples": 1, "eval.max_new_tokens": 8, "eval.loss_batches": 1,
        "track.enabled": False, "lora.dropout": 0.1, "prefix.projection_dim": 32, **extra}
    return load_config(SFTConfig, None, [f"{k}={v}" for k, v in overrides.items()])


@pytest.mark.parametrize("method", ["full", "lora", "prefix"])
def test_sigterm_checkpoints_then_resumes_exactly(base, tmp_path, method):
    """SIGTERM mid-run: a checkpoint at the step it stopped, no final output; the resumed run's losses equal an
    uninterrupted run's, bit for bit."""
    from llmkit.train.checkpoint import list_checkpoints

    long = {"train.max_steps": 100_000, "train.decay_steps": 12, "train.checkpoint_interval": 1000}
    out = tmp_path / "preempted"
    with sigterm_at_step(out / "metrics.jsonl", 3):
        stopped = finetune_sft(_cfg(base, out, method, **long))
    assert stopped["stopped_by_signal"] and stopped["final"] is None and not (out / "final").exists()
    k = stopped["step"]
    assert 3 <= k < 12 and list_checkpoints(out / "checkpoints")[-1][0] == k
    resumed = finetune_sft(_cfg(base, out, method, **{**long, "train.max_steps": 12}), resume=True)
    reference = finetune_sft(_cfg(base, tmp_path / "reference", method, **{**long, "train.max_steps": 12}))
    assert resumed["step"] == 12 and resumed["final"]
    assert [r["loss"] for r in resumed["history"] if "loss" in r] == \
        [r["loss"] for r in reference["history"] if "loss" in r][k:]
    assert resumed["eval_loss"] == reference["eval_loss"]


@pytest.mark.parametrize("method", ["full", "lora", "prefix"])
def test_each_method_trains_resumes_exactly_and_saves(base, tmp_path, method):
    straight = finetune_sft(_cfg(base, tmp_path / "straight", method))
    assert straight["step"] == 6 and straight["final"]
    losses = [r["loss"] for r in straight["history"] if "loss" in r]
    # resume: 2 steps, then continue to 6 from the checkpoint at step 2
    first = _cfg(base, tmp_path / "resumed", method, **{"train.max_steps": 2})
    finetune_sft(first)
    resumed = finetune_sft(_cfg(base, tmp_path / "resumed", method), resume=True)
    resumed_losses = [r["loss"] for r in resumed["history"] if "loss" in r]
    assert resumed_losses == losses[2:]  # bit-identical continuation: weights, optimizer, RNG, data position
    final = Path(straight["final"])
    if method == "full":
        assert (final / "model.safetensors").is_file() and straight["trainable_share"] == 1.0
    else:
        cfg = json.loads((final / "adapter_config.json").read_text())
        assert cfg["peft_type"] == ("LORA" if method == "lora" else "PREFIX_TUNING")
        assert (final / "adapter_model.safetensors").is_file() and straight["trainable_share"] < 0.5
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert len(results["answers"]) == 2 and len(results["samples"]) == 1
    assert 0.0 <= results["rouge_l"] <= 1.0


def test_only_the_adapter_changes(base, tmp_path):
    from llmkit.models.io import load_model

    finetune_sft(_cfg(base, tmp_path / "lora", "lora"))
    state = torch.load(next((tmp_path / "lora" / "checkpoints").glob("step-*")) / "optimizer.pt",
                       weights_only=False)
    assert state  # the optimizer holds state for the adapter parameters only
    before = load_model(base / "model").state_dict()
    from llmkit.models.adapters import load_adapter
    adapted = load_adapter(load_model(base / "model"), tmp_path / "lora" / "final")
    for name, tensor in adapted.state_dict().items():
        plain = name.replace(".base.", ".")
        if plain in before and "lora" not in name:
            assert torch.equal(tensor, before[plain]), name


def test_merge_and_generate_with_the_adapter(base, tmp_path, capsys):
    from llmkit.infer.load import load_for_inference

    finetune_sft(_cfg(base, tmp_path / "lora", "lora", **{"train.max_steps": 4}))
    adapter = tmp_path / "lora" / "final"
    assert main(["merge", "--model", str(base / "model"), "--adapter", str(adapter),
                 "--out", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    adapted, tok, template = load_for_inference(base / "model", adapter)
    merged, _, merged_template = load_for_inference(tmp_path / "merged")
    assert template is not None and merged_template == template
    x = torch.tensor([tok.encode("Give three tips for staying healthy.")])
    assert torch.allclose(adapted(x)[0], merged(x)[0], atol=1e-5)
    assert main(["generate", "--model", str(base / "model"), "--adapter", str(adapter), "--prompt", "Hello",
                 "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert main(["generate", "--model", str(tmp_path / "merged"), "--prompt", "Hello",
                 "--max-new-tokens", "5", "--seed", "1"]) == 0
    out = capsys.readouterr().out.split("\n")  # not splitlines(): sampled text may hold \f or \x1c
    assert out[0] == out[1]  # adapter on the fly and merged weights say the same thing
    finetune_sft(_cfg(base, tmp_path / "prefix", "prefix", **{"train.max_steps": 2}))
    assert main(["merge", "--model", str(base / "model"), "--adapter", str(tmp_path / "prefix" / "final"),
                 "--out", str(tmp_path / "nope")]) == 2


def test_cli_finetune_dispatches_on_task(base, tmp_path, capsys):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"base_model: {base / 'model'}\nmethod: lora\n")
    overrides = [f"{k}={v}" for k, v in {
        "out_dir": str(tmp_path / "cli"), "data.paths": f"[{shared_file('instruct/alpaca_zh_demo.json')}]",
        "data.mix_pretrain": 0, "train.max_steps": 2, "train.batch_size": 2, "train.progress": False,
        "eval.answers": 1, "eval.samples": 0, "eval.max_new_tokens": 4, "eval.loss_batches": 1,
        "track.enabled": False}.items()]
    assert main(["finetune", "--config", str(recipe), *overrides]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "lora" and summary["step"] == 2
    assert main(["finetune", "--config", str(recipe), *overrides, "lora.rank=4"]) == 2
    assert "lora.rank" in capsys.readouterr().err


def test_tracked_with_parent_model(base, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg = _cfg(base, tmp_path / "runs" / "sft", "lora", **{"track.enabled": True, "train.max_steps": 2})
    summary = finetune_sft(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    run = client.get_run(summary["tracking_run_id"])
    assert run.data.tags["llmkit.parent_model"] == str((base / "model").resolve())
    contexts = {i.dataset.name: i.tags[0].value for i in run.inputs.dataset_inputs}
    assert contexts["base-model"] == "base_model" and contexts["instructions"] == "training"
    assert 0 < float(run.data.params["trainable_share"]) < 1
    assert {"exact_match", "rouge_l", "eval_loss"} <= set(run.data.metrics)


def test_encoder_decoder_is_instruction_tuned_too(base, tmp_path, capsys):
    """T5-style base: source = the rendered prompt, target = the answer; all three methods; resume."""
    from llmkit.models.encdec import EncDecConfig, EncoderDecoder
    from llmkit.models.io import save_model
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.load(base / "model")
    torch.manual_seed(0)
    t5 = EncoderDecoder(EncDecConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, d_model=32, n_head=2,
                                     d_kv=16, d_ff=64, pad_token_id=tok.pad_id, decoder_start_token_id=tok.pad_id))
    save_model(t5, tmp_path / "t5", tok)
    t5_base = tmp_path / "t5base"
    t5_base.mkdir()
    (t5_base / "model").symlink_to(tmp_path / "t5")
    (t5_base / "pretrain.txt").symlink_to(base / "pretrain.txt")
    for method in ("full", "lora", "prefix"):
        summary = finetune_sft(_cfg(t5_base, tmp_path / f"t5-{method}", method))
        first = [r["loss"] for r in summary["history"] if "loss" in r]
        assert summary["step"] == 6 and all(math.isfinite(v) for v in first)
        assert len(json.loads((tmp_path / f"t5-{method}" / "results.json").read_text())["answers"]) == 2
    finetune_sft(_cfg(t5_base, tmp_path / "t5-cut", "lora", **{"train.max_steps": 2}))
    resumed = finetune_sft(_cfg(t5_base, tmp_path / "t5-cut", "lora"), resume=True)
    straight = finetune_sft(_cfg(t5_base, tmp_path / "t5-straight", "lora"))
    assert [r["loss"] for r in resumed["history"] if "loss" in r] == \
        [r["loss"] for r in straight["history"] if "loss" in r][2:]
    assert main(["generate", "--model", str(tmp_path / "t5"), "--adapter", str(tmp_path / "t5-lora" / "final"),
                 "--prompt", "Hello", "--max-new-tokens", "4", "--seed", "1"]) == 0


def test_seq2seq_batches_split_prompt_and_answer():
    from llmkit.finetune.sft import seq2seq_batch

    x = torch.tensor([[1, 2, 3, 4, 5, 0], [7, 8, 9, 10, 11, 12]])
    y = torch.tensor([[-100, -100, 4, 5, 6, -100], [8, 9, 10, 11, 12, 13]])  # row 2: a pretraining window
    batch = seq2seq_batch(x, y, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]
    assert batch["labels"].tolist() == [[4, 5, 6, -100], [10, 11, 12, 13]]


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_baseline_answers_are_the_base_models_and_survive_a_resume(base, tmp_path, method):
    from llmkit.chat import load_chat_template
    from llmkit.infer.generate import SamplingParams
    from llmkit.infer.reply import chat_reply
    from llmkit.models.io import load_model
    from llmkit.tokenizer import Tokenizer

    extra = {"eval.baseline": True, "train.max_steps": 2}
    finetune_sft(_cfg(base, tmp_path / "run", method, **extra))
    baseline = json.loads((tmp_path / "run" / "baseline.json").read_text())
    plain, tok = load_model(base / "model"), Tokenizer.load(base / "model")
    template = load_chat_template(base / "model")
    for row in baseline["answers"]:
        want = chat_reply(plain, tok, template, [{"role": "user", "content": row["prompt"]}],
                          SamplingParams(max_new_tokens=8, temperature=0.0))
        assert row["answer"] == want  # untrained: the base model's own greedy answer, adapter or not
    (tmp_path / "run" / "baseline.json").write_text(json.dumps({**baseline, "rouge_l": -1.0}))
    finetune_sft(_cfg(base, tmp_path / "run", method, **{**extra, "train.max_steps": 4}), resume=True)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["baseline"]["rouge_l"] == -1.0  # read back, not recomputed from the trained model
    assert results["baseline"]["answers"] == baseline["answers"]


def test_rows_are_as_wide_as_the_longest_example_not_the_models_context(base, tmp_path):
    from llmkit.models.decoder import Decoder, DecoderConfig
    from llmkit.models.io import load_model, save_model
    from llmkit.tokenizer import Tokenizer

    small = load_model(base / "model")
    wide = Decoder(DecoderConfig(**{**small.config.__dict__, "block_size": 4096}))  # an imported model's context
    save_model(wide, tmp_path / "wide", Tokenizer.load(base / "model"))
    cfg = _cfg(base, tmp_path / "run", "lora", **{"base_model": str(tmp_path / "wide"), "data.max_len": 48,
                                                   "data.mix_pretrain": 0.0, "train.max_steps": 1})
    assert finetune_sft(cfg)["batch_width"] <= 47

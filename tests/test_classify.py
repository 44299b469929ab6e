"""Encoder fine-tuning for classification (llmkit.finetune.classify): the domain-identification dataset,
a short run that beats chance, exact resume, config refusal."""

import json
from pathlib import Path

import pytest
import torch

from conftest import shared_file, sigterm_at_step
from llmkit.config import ConfigError, load_config
from llmkit.finetune.classify import (
    ClassifyConfig,
    ClassifyDataConfig,
    build_dataset,
    encode_split,
    finetune_classifier,
    read_labelled_jsonl,
    snippets,
)
from llmkit.tokenizer import iter_texts
from llmkit.train.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """Three small corpora (first ~60 KB of each reference file): label -> path."""
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for label, rel in (("literature", "en/tinyshakespeare.txt"), ("encyclopedia", "en/wiki_demo.txt")):
        p = root / Path(rel).name
        p.write_text(shared_file(rel).read_text(encoding="utf-8")[:60_000], encoding="utf-8")
        out[label] = str(p)
    web = root / "c4_demo.jsonl"
    web.write_text("".join(shared_file("en/c4_demo.jsonl").read_text(encoding="utf-8").splitlines(True)[:40]),
                   encoding="utf-8")
    out["web"] = str(web)
    return out


def overrides(out_dir: Path, sources: dict[str, str], **extra) -> list[str]:
    src = ", ".join(f"{k}: {v}" for k, v in sources.items())
    base = {
        "out_dir": str(out_dir), "data.sources": f"{{{src}}}", "data.snippet_chars": 192,
        "data.max_per_class": 200, "data.test_fraction": 0.2, "data.tokenizer_vocab_size": 400,
        "model.n_layer": 1, "model.d_model": 32, "model.n_head": 2, "model.d_ff": 64, "model.block_size": 80,
        "model.dropout": 0.1,  # dropout consumes RNG: exact resume must restore it
        "train.batch_size": 16, "train.max_steps": 60, "train.warmup_steps": 5, "train.lr": 3e-3,
        "train.min_lr": 3e-4, "train.eval_interval": 30, "train.log_interval": 1, "train.checkpoint_interval": 10,
        "train.progress": False, "track.enabled": False,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# -- data -----------------------------------------------------------------------------------------


def test_snippets_cut_and_keep_long_tail():
    assert snippets("abcdefghij", 4) == ["abcd", "efgh", "ij"]
    assert snippets("abcdefghi", 4) == ["abcd", "efgh"]  # a 1-char tail is shorter than 4 // 2
    assert snippets("abcd    ", 4) == ["abcd"]  # whitespace-only pieces are dropped


def test_domain_dataset_is_stratified_disjoint_and_correctly_labelled(sources):
    cfg = ClassifyDataConfig(sources=sources, snippet_chars=128, test_fraction=0.2, seed=3)
    train, test, names = build_dataset(cfg)
    assert names == ["encyclopedia", "literature", "web"]
    n = len(names)
    # balanced: every class has the same size, in each split
    assert len(set(train.counts(n))) == 1 and len(set(test.counts(n))) == 1
    assert test.counts(n)[0] == round((train.counts(n)[0] + test.counts(n)[0]) * 0.2)
    assert not set(train.texts) & set(test.texts)  # no snippet in both splits
    assert len(set(train.texts)) == len(train)
    corpora = {label: "\n".join(iter_texts(p)) for label, p in sources.items()}
    for split in (train, test):
        for text, y in zip(split.texts, split.labels):
            assert text in corpora[names[y]]
            assert 64 <= len(text) <= 128
    # deterministic for a seed, different for another
    again = build_dataset(cfg)
    assert again[0].texts == train.texts and again[1].texts == test.texts
    other = build_dataset(ClassifyDataConfig(sources=sources, snippet_chars=128, test_fraction=0.2, seed=4))
    assert set(other[1].texts) != set(test.texts)


def test_max_per_class_and_unbalanced(sources):
    train, test, names = build_dataset(ClassifyDataConfig(sources=sources, max_per_class=50, test_fraction=0.1))
    assert train.counts(3) == [45, 45, 45] and test.counts(3) == [5, 5, 5]
    train, test, _ = build_dataset(ClassifyDataConfig(sources=sources, balance=False, snippet_chars=128))
    sizes = [a + b for a, b in zip(train.counts(3), test.counts(3))]
    assert len(set(sizes)) > 1


def test_labelled_jsonl(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"text": f"good film number {i}", "label": "pos"} for i in range(5)]
    rows += [{"text": f"bad film number {i}", "label": "neg"} for i in range(5)]
    rows.append({"text": "also bad", "label": "neg"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    assert read_labelled_jsonl(path)[0] == ("good film number 0", "pos")
    train, test, names = build_dataset(ClassifyDataConfig(sources={}, jsonl=str(path), test_fraction=0.2))
    assert names == ["neg", "pos"]
    assert train.counts(2) == [4, 4] and test.counts(2) == [1, 1]
    for text, y in zip(train.texts + test.texts, train.labels + test.labels):
        assert ("good" in text) == (names[y] == "pos")


@pytest.mark.parametrize("bad, match", [
    ({"text": "no label here"}, r"bad\.jsonl:3: record has no 'label' field"),
    ({"label": "pos"}, r"bad\.jsonl:3: record has no 'text' field"),
    ({"text": "x", "label": ["a"]}, r"bad\.jsonl:3: 'label' must be"),
    ("{not json", r"bad\.jsonl:3: not valid JSON"),
])
def test_malformed_jsonl_is_refused_naming_the_line(tmp_path, bad, match):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "fine", "label": "a"}) + "\n"
    path.write_text(good + good + (bad if isinstance(bad, str) else json.dumps(bad)) + "\n")
    with pytest.raises(ValueError, match=match):
        read_labelled_jsonl(path)
    with pytest.raises(ValueError, match=match):
        build_dataset(ClassifyDataConfig(sources={}, jsonl=str(path)))


def test_encode_split_pads_masks_and_truncates(sources):
    from llmkit.finetune.classify import LabelledSplit
    from llmkit.tokenizer import train_char

    tok = train_char(["abcdefgh "])
    split = LabelledSplit(["abc", "abcdefgh abcdefgh"], [0, 1])
    ids, mask, labels = encode_split(split, tok, block_size=8)
    assert ids.shape == mask.shape == (2, 8)
    assert ids[0, 0] == tok.bos_id and ids[0, 4:].eq(tok.pad_id).all()
    assert mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0] and mask[1].all()
    assert labels.tolist() == [0, 1]


# -- training -------------------------------------------------------------------------------------


def test_short_run_beats_chance_and_writes_outputs(tmp_path, sources):
    from llmkit.models import load_model

    out = tmp_path / "run"
    cfg = load_config(ClassifyConfig, None, overrides(out, sources))
    summary = finetune_classifier(cfg)
    assert summary["step"] == 60
    assert summary["accuracy"] > 0.6, summary["accuracy"]  # chance is 1/3
    results = json.loads((out / "results.json").read_text())
    assert results["labels"] == ["encyclopedia", "literature", "web"]
    assert set(results["per_class"]["web"]) == {"precision", "recall", "f1", "support"}
    confusion = torch.tensor(results["confusion_matrix"])
    assert confusion.shape == (3, 3) and confusion.sum() == results["n_test"]
    assert abs(confusion.diag().sum().item() / results["n_test"] - results["accuracy"]) < 1e-9
    labels = json.loads((out / "final" / "labels.json").read_text())
    assert labels["label2id"] == {"encyclopedia": 0, "literature": 1, "web": 2}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "accuracy" in r] == [30, 60]
    # the final model directory loads back and gives the reported accuracy
    from llmkit.finetune.classify import evaluate_classifier
    from llmkit.tokenizer import Tokenizer

    model = load_model(out / "final")
    _, test, _ = build_dataset(cfg.data)
    data = encode_split(test, Tokenizer.load(out / "final"), cfg.model.block_size)
    _, conf = evaluate_classifier(model, data, 64, torch.device("cpu"), 3)
    assert conf == results["confusion_matrix"]


def test_resume_is_exact(tmp_path, sources):
    extra = {"train.max_steps": 20, "train.decay_steps": 20, "data.max_per_class": 60, "train.eval_interval": 10}
    full = finetune_classifier(load_config(ClassifyConfig, None, overrides(tmp_path / "full", sources, **extra)))
    out = tmp_path / "cut"
    finetune_classifier(load_config(ClassifyConfig, None, overrides(out, sources, **{**extra, "train.max_steps": 10})))
    with pytest.raises(FileExistsError, match="--resume"):
        finetune_classifier(load_config(ClassifyConfig, None, overrides(out, sources, **extra)))
    resumed = finetune_classifier(load_config(ClassifyConfig, None, overrides(out, sources, **extra)), resume=True)
    def losses(history):  # everything but the timing
        return [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s")} for r in history
                if r["step"] > 10]

    assert losses(resumed["history"]) == losses(full["history"])
    assert len(losses(resumed["history"])) == 11  # 10 loss rows + the eval at step 20
    assert resumed["confusion_matrix"] == full["confusion_matrix"]
    # metrics.jsonl tells one history: steps 1..20 once each
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 21))


@pytest.mark.parametrize("method", ["full", "lora", "prefix"])
def test_sigterm_checkpoints_then_resumes_exactly(tmp_path, sources, method):
    """SIGTERM mid-run: a checkpoint at the step it stopped and no final model; resumed, every loss row and
    the final confusion matrix equal an uninterrupted run's (dropout on: the RNG is restored too)."""
    long = {"train.max_steps": 100_000, "train.decay_steps": 20, "train.checkpoint_interval": 1000,
            "train.eval_interval": 5, "data.max_per_class": 60, "method": method}
    out = tmp_path / "preempted"
    with sigterm_at_step(out / "metrics.jsonl", 4):
        stopped = finetune_classifier(load_config(ClassifyConfig, None, overrides(out, sources, **long)))
    assert stopped["stopped_by_signal"] and stopped["final_model"] is None and not (out / "final").exists()
    k = stopped["step"]
    assert 4 <= k < 20 and list_checkpoints(out / "checkpoints")[-1][0] == k
    target = {**long, "train.max_steps": 20}
    resumed = finetune_classifier(load_config(ClassifyConfig, None, overrides(out, sources, **target)), resume=True)
    reference = finetune_classifier(load_config(ClassifyConfig, None, overrides(tmp_path / "ref", sources, **target)))

    def rows(history, after):  # everything but the timing
        return [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s")} for r in history
                if r["step"] > after]

    assert rows(resumed["history"], k) == rows(reference["history"], k)
    assert resumed["confusion_matrix"] == reference["confusion_matrix"]


def test_init_from_pretrained_encoder(tmp_path, sources):
    from llmkit.finetune.classify import _build_model
    from llmkit.models import save_model
    from llmkit.models.encoder import Encoder, EncoderConfig
    from llmkit.tokenizer import train_char

    tok = train_char([Path(p).read_text(encoding="utf-8") for p in sources.values()])
    pre = Encoder(EncoderConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, d_model=32, n_head=2))
    save_model(pre, tmp_path / "pre", tok)
    cfg = load_config(ClassifyConfig, None, overrides(tmp_path / "ft", sources, init_from=str(tmp_path / "pre")))
    model = _build_model(cfg, 3, tok)
    assert model.config.n_labels == 3 and cfg.model.d_model == 32
    assert torch.equal(model.encoder.tok_emb.weight, pre.tok_emb.weight)
    assert torch.equal(model.encoder.blocks[0].norm2.weight, pre.blocks[0].norm2.weight)


# -- config ---------------------------------------------------------------------------------------


def test_shipped_config_loads():
    cfg = load_config(ClassifyConfig, ROOT / "configs" / "bert_classify.yaml")
    assert sorted(cfg.data.sources) == ["encyclopedia", "literature", "web"]
    assert cfg.model.d_model == 128 and 2 <= cfg.model.n_layer <= 4


def test_unknown_key_is_refused_naming_key_and_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*unknown key 'train\.max_step'"):
        load_config(ClassifyConfig, path)
    path.write_text("data:\n  snippet_chars: 0\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*snippet_chars"):
        load_config(ClassifyConfig, path)


def test_cli_finetune(tmp_path, sources):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "llmkit", "finetune", "--config", str(ROOT / "configs/bert_classify.yaml"),
                        *overrides(tmp_path / "cli", sources, **{"train.max_steps": 20, "train.eval_interval": 20})],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.0 <= summary["accuracy"] <= 1.0 and (tmp_path / "cli" / "final" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def trained_encoder(tmp_path_factory, sources) -> Path:
    """An encoder that has learned something about these texts (a fully fine-tuned classifier's)."""
    out = tmp_path_factory.mktemp("trained") / "full"
    finetune_classifier(load_config(ClassifyConfig, None, overrides(out, sources)))
    return out / "final"


@pytest.mark.parametrize("method", ["lora", "prefix"])
def test_adapter_methods_train_a_frozen_encoder(tmp_path, sources, trained_encoder, method):
    from llmkit.models import load_model

    # the head starts fresh and the encoder is frozen: only adapters + head learn the task again
    extra = {"method": method, "init_from": str(trained_encoder), "data.tokenizer": str(trained_encoder),
             "train.max_steps": 40, "train.lr": 3e-3, "prefix.projection_dim": 32,
             "lora.r": 4, "lora.alpha": 8, "lora.targets": "[q_proj, v_proj]"}
    summary = finetune_classifier(load_config(ClassifyConfig, None, overrides(tmp_path / method, sources, **extra)))
    assert summary["accuracy"] > 0.5, summary["accuracy"]  # chance is 1/3
    assert summary["n_trainable"] < 0.8 * summary["n_params"]
    final = tmp_path / method / "final"
    if method == "lora":  # merged into a plain model dir that reproduces the reported confusion matrix
        assert (final / "adapter" / "adapter_config.json").is_file()
        from llmkit.finetune.classify import evaluate_classifier
        from llmkit.tokenizer import Tokenizer

        cfg = load_config(ClassifyConfig, None, overrides(tmp_path / method, sources, **extra))
        _, test, _ = build_dataset(cfg.data)
        data = encode_split(test, Tokenizer.load(final), cfg.model.block_size)
        _, conf = evaluate_classifier(load_model(final), data, 64, torch.device("cpu"), 3)
        assert conf == summary["confusion_matrix"]
    else:
        assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"

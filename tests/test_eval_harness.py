"""`llmkit eval` (llmkit.eval): log-likelihoods against the model's own logits, batching, lm-eval's metrics,
the published prompt layouts, GSM8K answer extraction, the per-example cache and malformed rows."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from llmkit.eval import harness, tasks
from llmkit.eval.harness import (
    EvalConfig,
    acc_from_loglikelihoods,
    extract_flexible,
    extract_strict,
    run_eval,
)
from llmkit.eval.scoring import encode_pair, loglikelihoods, rolling_nll
from llmkit.eval.tasks import Example, TaskError, build_prompt, load_task, normalize_number


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random tiny decoder (block 64) with a char tokenizer covering every sample task file, and llmkit's
    chat template."""
    from llmkit.chat import DEFAULT_CHAT_TEMPLATE, save_chat_template
    from llmkit.models.decoder import Decoder, DecoderConfig
    from llmkit.models.io import save_model
    from llmkit.tokenizer import train_char

    tasks.parse_task_spec("sample_mmlu")  # makes data/eval_samples when it is missing
    texts = [p.read_text(encoding="utf-8") for p in sorted(tasks.SAMPLES_DIR.rglob("*")) if p.is_file()]
    tok = train_char(texts + ["Thefollowingaremultiplechoicequestions(withanswers)about.:\n以下是中国关于考试的单项选择题，"
                              "请选出其中的正确答案。答案：#$,-0123456789EZ[]"])
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=len(tok), block_size=64, n_layer=2, d_model=32, n_head=2,
                                  positions="rope", norm="rmsnorm", activation="swiglu"))
    out = tmp_path_factory.mktemp("evalmodel") / "m"
    save_model(model.eval(), out, tok)
    save_chat_template(out, DEFAULT_CHAT_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    from llmkit.infer.load import load_for_inference

    return load_for_inference(tiny_model_dir, device="cpu")


def direct_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    """Sum of log p(cont_i | ctx, cont_<i) from one forward of the whole sequence, token by token."""
    full = ctx + cont
    with torch.no_grad():
        logits, _ = model(torch.tensor([full[:-1]]))
    logp = F.log_softmax(logits[0].double(), dim=-1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_loglikelihood_equals_the_models_logits(loaded):
    model, tok, _ = loaded
    ctx, cont = encode_pair(tok, "What is the capital of France?\nAnswer:", " Paris", add_bos=False)
    assert tok.decode(cont) == " Paris" and len(cont) == 6
    (ll, greedy, cut), = loglikelihoods(model, [(ctx, cont)], batch_size=1)
    assert not cut
    assert ll == pytest.approx(direct_loglikelihood(model, ctx, cont), abs=1e-4)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ctx + cont[:-1]]))
    argmax = logits[0, len(ctx) - 1:].argmax(-1).tolist()
    assert greedy == (argmax == cont)


def test_batched_loglikelihoods_equal_one_at_a_time(loaded):
    model, tok, _ = loaded
    prompts = ["Question: Which planet is closest to the Sun?\nAnswer:", "2 + 2 =", "以下是中国关于小学数学考试的单项选择题",
               "x" * 80]  # the last is longer than the 64-token context: cut on the left
    conts = [" Mercury", " 4", "。答案：A", " B"]
    reqs = [encode_pair(tok, p, c, add_bos=False) for p in prompts for c in conts]
    one = loglikelihoods(model, reqs, batch_size=1)
    many = loglikelihoods(model, reqs, batch_size=7)
    assert [r[2] for r in one] == [False] * 12 + [True] * 4
    for a, b in zip(one, many):
        assert abs(a[0] - b[0]) < 1e-4 and a[1:] == b[1:]
    # and the cut one is the direct computation over the last block + 1 tokens
    ctx, cont = reqs[-1]
    keep = (ctx + cont)[-65:]
    assert one[-1][0] == pytest.approx(direct_loglikelihood(model, keep[:-len(cont)], cont), abs=1e-4)


def test_acc_norm_divides_by_characters_as_lm_eval():
    # lls -10, -12, -30 over choices of 2, 10 and 40 characters: acc picks the first (-10), acc_norm the third
    # (-5, -1.2, -0.75 per character)
    choices = ["ab", "b" * 10, "c" * 40]
    assert acc_from_loglikelihoods([-10.0, -12.0, -30.0], choices, gold=2) == (0.0, 1.0)
    assert acc_from_loglikelihoods([-10.0, -12.0, -30.0], choices, gold=0) == (1.0, 0.0)


def test_stderr_is_the_sample_standard_error():
    vals = [1, 0, 1, 1, 0]
    p = 0.6
    assert harness.mean_stderr(vals) == pytest.approx(math.sqrt(p * (1 - p) * 5 / 4 / 5))


MC = Example(id="x:1", source="x:1", subject="high_school_physics", question="What is 1 + 1?",
             choices=["1", "2", "3", "4"], gold=1)
SHOT = Example(id="d:1", source="d:1", subject="high_school_physics", question="What is 2 + 2?",
               choices=["3", "4", "5", "6"], gold=1)


def test_prompt_formats_are_the_published_layouts():
    assert build_prompt("mmlu", MC, [SHOT]) == (
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
        "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:")
    zh = Example(id="z", source="z", subject="计算机网络", question="1+1=？", choices=["1", "2", "3", "4"], gold=1)
    zs = Example(id="s", source="s", subject="计算机网络", question="2+2=？", choices=["3", "4", "5", "6"], gold=1)
    assert build_prompt("ceval", zh, [zs]) == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "2+2=？\nA. 3\nB. 4\nC. 5\nD. 6\n答案：B\n\n1+1=？\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")
    assert build_prompt("cmmlu", zh, []) == (
        "以下是关于计算机网络的单项选择题，请直接给出正确答案的选项。\n\n题目：1+1=？\nA. 1\nB. 2\nC. 3\nD. 4\n答案是：")
    arc = Example(id="a", source="a", question="Which gas do plants take in?", choices=["oxygen", "carbon dioxide"],
                  gold=1)
    assert build_prompt("arc", arc, []) == "Question: Which gas do plants take in?\nAnswer:"
    assert tasks.choice_texts("arc", arc) == ["oxygen", "carbon dioxide"]
    assert tasks.choice_texts("mmlu", MC) == ["A", "B", "C", "D"]
    g = Example(id="g", source="g", question="Tom has 3 apples and buys 2. How many?", text="3 + 2 = 5\n#### 5", gold="5")
    assert build_prompt("gsm8k", g, [g]) == ("Question: Tom has 3 apples and buys 2. How many?\nAnswer: 3 + 2 = 5\n#### 5"
                                            "\n\nQuestion: Tom has 3 apples and buys 2. How many?\nAnswer:")


def test_hellaswag_preprocessing(tmp_path):
    f = tmp_path / "hs.jsonl"
    f.write_text(json.dumps({"activity_label": "Baking cookies", "ctx_a": "A woman puts dough on a tray.",
                             "ctx_b": "she", "ctx": "x", "endings": ["puts it in the oven [title] Then.", "b", "c", "d"],
                             "label": 0}) + "\n")
    t = load_task(f"hellaswag:{f}")
    ex = t.examples[0]
    assert build_prompt("hellaswag", ex, []) == "Baking cookies: A woman puts dough on a tray. She"
    assert ex.choices[0] == "puts it in the oven. Then."


@pytest.mark.parametrize("text,strict,flexible,number", [
    ("3 boxes of 4 is 12.\n#### 12", "12", "12", "12"),
    ("The total is $1,234.\n#### 1,234", "1,234", "1,234", "1234"),
    ("#### -7 but then 9 more", "-7", "9", "-7"),
    ("so the answer is 42.", "[invalid]", "42.", "42"),
    ("It costs $4.50, so 12 dollars", "[invalid]", "12", "12"),
    ("no numbers here", "[invalid]", "[invalid]", "[invalid]"),
    ("#### 5.00", "5.00", "5.00", "5.00"),
])
def test_gsm8k_answer_extraction(text, strict, flexible, number):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible
    assert normalize_number(strict if strict != "[invalid]" else flexible) == number


def test_sample_tasks_load_clean_and_gsm8k_answers_are_correct(tmp_path):
    from llmkit.eval.make_samples import check_worked_answer, write_all

    counts = {"sample_mmlu": 99, "sample_ceval": 99, "sample_arc": 48, "sample_gsm8k": 50}
    for name, n in counts.items():
        t = load_task(name)
        assert (len(t.examples), t.malformed) == (n, [])
    mm = load_task("sample_mmlu")
    assert {e.subject for e in mm.examples} == set(mm.fewshot) and all(len(v) == 5 for v in mm.fewshot.values())
    for e in load_task("sample_gsm8k").examples:
        assert str(check_worked_answer(e.text)) == e.gold
    write_all(tmp_path)  # deterministic: the script writes the committed bytes
    for p in tasks.SAMPLES_DIR.rglob("*"):
        if p.is_file():
            assert (tmp_path / p.relative_to(tasks.SAMPLES_DIR)).read_bytes() == p.read_bytes(), p


def test_malformed_rows_are_reported_with_file_and_line(tmp_path):
    d = tmp_path / "mm" / "test"
    d.mkdir(parents=True)
    f = d / "algebra_test.csv"
    f.write_text('What is 1+1?,1,2,3,4,B\nbad row,1,2,B\n"What is 2+2?",3,4,5,6,E\n"multi\nline?",a,b,c,d,A\n'
                 'What is 3+3?,5,6,7,8,B\n')
    t = load_task(f"mmlu:{tmp_path / 'mm'}")
    assert [e.source for e in t.examples] == [f"{f}:1", f"{f}:4", f"{f}:6"]
    assert [str(m) for m in t.malformed] == [
        f"{f}:2: expected 6 fields (question,A,B,C,D,answer), got 4",
        f"{f}:3: answer 'E' is not one of A, B, C, D"]
    j = tmp_path / "arc.jsonl"
    good = {"question": {"stem": "q", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]},
            "answerKey": "B"}
    j.write_text(json.dumps(good) + "\n{not json\n" + json.dumps({"question": {"stem": "q"}}) + "\n")
    t = load_task(f"arc:{j}")
    assert len(t.examples) == 1 and [m.source for m in t.malformed] == [f"{j}:2", f"{j}:3"]
    g = tmp_path / "g.jsonl"
    g.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    assert [str(m) for m in load_task(f"gsm8k:{g}").malformed] == [f"{g}:1: answer does not end with '#### N'"]


def test_unknown_task_is_named(tmp_path, tiny_model_dir, capsys):
    from llmkit.cli import main

    with pytest.raises(TaskError, match="unknown task 'sample_mmlux'"):
        tasks.parse_task_spec("sample_mmlux")
    with pytest.raises(TaskError, match="unknown layout 'mmmlu'"):
        tasks.parse_task_spec(f"mmmlu:{tmp_path}")
    assert main(["eval", "--model", str(tiny_model_dir), "--tasks", "sample_arc,nope",
                 "--cache-dir", str(tmp_path)]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_cache_hit_on_rerun_and_resume_after_a_kill(tmp_path, tiny_model_dir, monkeypatch):
    cfg = EvalConfig(model=str(tiny_model_dir), tasks="sample_mmlu,sample_arc,sample_ppl_en", limit=12,
                     batch_size=5, cache_dir=str(tmp_path / "c"), out=str(tmp_path / "r.json"))
    first = run_eval(cfg)
    assert [t["computed"] for t in first["tasks"].values()] == [12, 12, 1]
    assert json.loads((tmp_path / "r.json").read_text())["tasks"]["sample_mmlu"]["n"] == 12

    import llmkit.infer.load

    def no_model(*a, **k):
        raise AssertionError("the model was loaded although every example is cached")

    monkeypatch.setattr(llmkit.infer.load, "load_for_inference", no_model)
    again = run_eval(cfg)
    assert [t["cached"] for t in again["tasks"].values()] == [12, 12, 1]
    assert again["tasks"]["sample_mmlu"]["metrics"] == first["tasks"]["sample_mmlu"]["metrics"]
    monkeypatch.undo()

    # killed half way: 5 lines written and a sixth cut off
    cache = next(iter(first["tasks"].values()))["cache_file"]
    lines = open(cache, encoding="utf-8").read().splitlines()
    with open(cache, "w", encoding="utf-8") as f:
        f.write("\n".join(lines[:5]) + "\n" + lines[5][:20])
    resumed = run_eval(cfg)
    t = resumed["tasks"]["sample_mmlu"]
    assert (t["cached"], t["computed"]) == (5, 7)
    assert t["metrics"] == first["tasks"]["sample_mmlu"]["metrics"]
    assert t["subjects"] == first["tasks"]["sample_mmlu"]["subjects"]

    # another prompt format (shots) or another task file is another cache entry
    shots = run_eval(EvalConfig(**{**cfg.__dict__, "shots": 1, "tasks": "sample_arc", "out": None}))
    assert shots["tasks"]["sample_arc"]["computed"] == 12
    copy = tmp_path / "arc"
    shutil.copytree(tasks.SAMPLES_DIR / "arc", copy)
    with open(copy / "ARC-Sample-Test.jsonl", "a") as f:
        f.write("\n")  # same rows, other bytes: the digest changes
    other = run_eval(EvalConfig(**{**cfg.__dict__, "tasks": f"arc:{copy}", "out": None}))
    assert other["tasks"][f"arc:{copy.name}"]["computed"] == 12


def test_results_have_subjects_counts_and_stderr(tmp_path, tiny_model_dir):
    r = run_eval(EvalConfig(model=str(tiny_model_dir), tasks="sample_ceval", limit=30, cache_dir=str(tmp_path)))
    t = r["tasks"]["sample_ceval"]
    assert sum(s["n"] for s in t["subjects"].values()) == t["n"] == 30
    acc = sum(s["acc"]["value"] * s["n"] for s in t["subjects"].values()) / 30
    assert t["metrics"]["acc"]["value"] == pytest.approx(acc)
    p = t["metrics"]["acc"]["value"]
    assert t["metrics"]["acc"]["stderr"] == pytest.approx(math.sqrt(p * (1 - p) * 30 / 29 / 30))
    assert t["example_prompt"].startswith("以下是中国关于")
    flat = harness.flat_metrics(r)
    assert flat["sample_ceval.acc"] == p and any(k.startswith("sample_ceval.中国地理.") for k in flat)


def test_perplexity_and_bits_per_byte(tmp_path, tiny_model_dir, loaded):
    model, tok, _ = loaded
    text = "Plants take water from the soil through their roots. " * 3  # > one 64-token window
    f = tmp_path / "t.txt"
    f.write_text(text)
    r = run_eval(EvalConfig(model=str(tiny_model_dir), tasks=f"ppl:{f}", cache_dir=str(tmp_path / "c")))
    t = r["tasks"]["ppl:t.txt"]
    ids = [tok.bos_id] + tok.encode(text)
    nll, n = rolling_nll(model, ids, batch_size=1)
    assert n == len(ids) - 1 == t["tokens"]
    direct = 0.0  # window by window, straight from the logits
    for s in range(0, n, 64):
        x = ids[s:s + 64][: n - s]
        with torch.no_grad():
            logits, _ = model(torch.tensor([x]))
        direct += float(F.cross_entropy(logits[0].double(), torch.tensor(ids[s + 1:s + 1 + len(x)]), reduction="sum"))
    assert nll == pytest.approx(direct, rel=1e-5)
    assert t["metrics"]["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-6)
    assert t["metrics"]["bits_per_byte"] == pytest.approx(nll / math.log(2) / len(text.encode()), rel=1e-6)


def test_gsm8k_generation_runs_greedy_and_scores(tmp_path, tiny_model_dir):
    r = run_eval(EvalConfig(model=str(tiny_model_dir), tasks="sample_gsm8k", limit=3, shots=0, max_new_tokens=6,
                            cache_dir=str(tmp_path)))
    t = r["tasks"]["sample_gsm8k"]
    assert t["n"] == 3 and set(t["metrics"]) == {"exact_match_strict", "exact_match_flexible"}
    rows = [json.loads(x) for x in open(t["cache_file"], encoding="utf-8")]
    assert all(len(x["output"]) <= 6 for x in rows)  # char tokenizer: one token a character
    again = run_eval(EvalConfig(model=str(tiny_model_dir), tasks="sample_gsm8k", limit=3, max_new_tokens=6,
                                cache_dir=str(tmp_path / "again")))
    assert [json.loads(x)["output"] for x in open(again["tasks"]["sample_gsm8k"]["cache_file"])] == \
        [x["output"] for x in rows]  # greedy: the same text every time


def test_chat_template_prompts_are_the_models_user_turn(tmp_path, tiny_model_dir, loaded):
    from llmkit.chat import encode_chat

    model, tok, template = loaded
    cfg = EvalConfig(model=str(tiny_model_dir), tasks="sample_arc", limit=2, chat_template=True,
                     cache_dir=str(tmp_path))
    r = run_eval(cfg)
    rec = json.loads(open(r["tasks"]["sample_arc"]["cache_file"]).readline())
    task = load_task("sample_arc")
    ex = task.examples[0]
    ctx, _ = encode_chat(tok, [{"role": "user", "content": build_prompt("arc", ex, [])}], template,
                         add_generation_prompt=True)
    expect = [direct_loglikelihood(model, ctx, tok.encode(c)) for c in ex.choices]
    assert rec["ll"] == pytest.approx(expect, abs=1e-4)
    assert r["tasks"]["sample_arc"]["prompt_format"]["chat_template"] is not None


def test_mlflow_params_and_metrics(tmp_path, tiny_model_dir):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = run_eval(EvalConfig(model=str(tiny_model_dir), tasks="sample_arc", limit=4, cache_dir=str(tmp_path / "c"),
                            out=str(tmp_path / "r.json"), track=True, tracking_uri=uri))
    run = MlflowClient(uri).get_run(r["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["tasks"] == "sample_arc"
    assert run.data.metrics["sample_arc.acc"] == r["tasks"]["sample_arc"]["metrics"]["acc"]["value"]
    assert [a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)] == ["r.json"]


def test_cmmlu_layout_dirs_and_header(tmp_path):
    for split, rows in (("dev", [["0", "1+1=？", "1", "2", "3", "4", "B"]]),
                        ("test", [["0", "2+2=？", "3", "4", "5", "6", "B"], ["1", "3+3=？", "5", "6", "7", "8", "B"]])):
        (tmp_path / split).mkdir()
        (tmp_path / split / "初中数学.csv").write_text(
            ",Question,A,B,C,D,Answer\n" + "".join(",".join(r) + "\n" for r in rows), encoding="utf-8")
    t = load_task(f"cmmlu:{tmp_path}")
    assert [e.question for e in t.examples] == ["2+2=？", "3+3=？"] and t.malformed == []
    assert [e.question for e in t.fewshot["初中数学"]] == ["1+1=？"]
    assert build_prompt("cmmlu", t.examples[0], tasks.fewshot_for(t, t.examples[0], 1)).startswith(
        "以下是关于初中数学的单项选择题，请直接给出正确答案的选项。\n\n题目：1+1=？\nA. 1\nB. 2\nC. 3\nD. 4\n答案是：B\n\n题目：2+2=？")


def test_parquet_in_the_hf_layout(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [{"id": "q1", "question": {"stem": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["A", "B"]}},
             "answerKey": "B"},
            {"id": "q2", "question": {"stem": "Which is a solid?", "choices": {"text": ["ice", "steam"], "label": ["1", "2"]}},
             "answerKey": "1"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    t = load_task(f"arc:{tmp_path / 'test.parquet'}")
    assert [(e.choices, e.gold) for e in t.examples] == [(["ice", "steam"], 1), (["ice", "steam"], 0)]


def test_ceval_subject_mapping_names_the_subject_and_groups_categories(tmp_path, tiny_model_dir):
    """C-Eval's subject_mapping.json: the prompt header takes the Chinese name, results group by category, and
    the mapping is part of the task's digest (a changed name is a new cache key)."""
    root = tmp_path / "ceval"
    shutil.copytree(tasks.SAMPLES_DIR / "ceval", root)
    subjects = sorted({p.stem.rsplit("_", 1)[0] for p in (root / "val").glob("*_val.csv")})
    plain = load_task(f"ceval:{root}")
    assert build_prompt("ceval", plain.examples[0], []).startswith(f"以下是中国关于{plain.examples[0].subject}考试")
    mapping = {s: [s.upper(), f"科目{i}", "STEM" if i % 2 else "Humanities"] for i, s in enumerate(subjects)}
    (root / "subject_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False), encoding="utf-8")
    mapped = load_task(f"ceval:{root}")
    ex = mapped.examples[0]
    assert build_prompt("ceval", ex, []).startswith(f"以下是中国关于{mapping[ex.subject][1]}考试的单项选择题")
    assert mapped.digest() != plain.digest()
    res = run_eval(EvalConfig(model=str(tiny_model_dir), tasks=f"ceval:{root}", cache_dir=str(tmp_path / "c"),
                              device="cpu"))["tasks"]["ceval:ceval"]
    cats = res["categories"]
    assert set(cats) == {"STEM", "Humanities"}
    stem = [s for i, s in enumerate(subjects) if i % 2]
    assert cats["STEM"]["subjects"] == len(stem)
    assert cats["STEM"]["acc"] == pytest.approx(sum(res["subjects"][s]["acc"]["value"] for s in stem) / len(stem))
    (root / "subject_mapping.json").write_text('{"x": 3}', encoding="utf-8")
    with pytest.raises(TaskError, match="subject 'x'"):
        load_task(f"ceval:{root}")

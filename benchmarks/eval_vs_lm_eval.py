"""llmkit eval vs lm-evaluation-harness on the same local task files, prompts and model.

The llmkit model is exported to a Hugging Face directory (`llmkit.models.hf.export_hf`); lm-eval runs its
`hf` model on it with task YAMLs written here for the sample task files (the same prompt layouts: MMLU's
header and "Answer:", C-Eval's header and "答案：", ARC's "Question: ...\\nAnswer:"; few-shot examples
taken first-n from the dev / train files, as llmkit does); llmkit runs `run_eval` on the llmkit model dir.
Prints one JSON object: per task acc / acc_norm from both, and with --log-samples the largest per-choice
log-likelihood difference over every example.

lm_eval is NOT a dependency of llmkit and must not go into .venv (it may move torch / transformers). Give
the interpreter of a separate environment that has it, e.g. (reusing .venv's torch and transformers read-only):

    python3 -m venv /tmp/lmeval-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/lmeval-venv/lib/python3.11/site-packages/zz.pth
    /tmp/lmeval-venv/bin/pip install lm_eval==0.4.13
    .venv/bin/python benchmarks/eval_vs_lm_eval.py --lm-eval-python /tmp/lmeval-venv/bin/python --shots 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

UTILS = '''
def process_arc(dataset):
    def one(doc):
        q = doc["question"]
        ch = q["choices"]
        if isinstance(ch, dict):
            texts, labels = list(ch["text"]), list(ch["label"])
        else:
            texts, labels = [c["text"] for c in ch], [c["label"] for c in ch]
        return {"query": "Question: " + q["stem"] + "\\nAnswer:", "choices": texts,
                "gold": labels.index(doc["answerKey"])}
    return dataset.map(one)
'''


def _yaml(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=1)  # JSON is YAML


def write_task_yamls(out: Path, samples: Path) -> dict[str, list[str]]:
    """One lm-eval task per subject (its header names the subject) and one for ARC; returns llmkit task ->
    lm-eval task names."""
    from llmkit.eval.tasks import pretty_subject

    out.mkdir(parents=True, exist_ok=True)
    (out / "llmkit_utils.py").write_text(UTILS)
    csv_kwargs = {"keep_default_na": False, "na_filter": False}
    names: dict[str, list[str]] = {"sample_mmlu": [], "sample_ceval": [], "sample_arc": []}
    for test in sorted((samples / "mmlu" / "test").glob("*_test.csv")):
        subject = test.name[:-len("_test.csv")]
        name = f"llmkit_mmlu_{subject}"
        (out / f"{name}.yaml").write_text(_yaml({
            "task": name, "dataset_path": "csv",
            "dataset_kwargs": {"data_files": {"test": str(test), "dev": str(samples / "mmlu" / "dev" / f"{subject}_dev.csv")},
                               "column_names": ["question", "A", "B", "C", "D", "answer"], **csv_kwargs},
            "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "description": f"The following are multiple choice questions (with answers) about {pretty_subject(subject)}.\n\n",
            "doc_to_text": "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:",
            "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
            "target_delimiter": " ", "fewshot_delimiter": "\n\n",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))
        names["sample_mmlu"].append(name)
    for i, test in enumerate(sorted((samples / "ceval" / "val").glob("*_val.csv"))):
        subject = test.name[:-len("_val.csv")]
        name = f"llmkit_ceval_{i}"
        (out / f"{name}.yaml").write_text(_yaml({
            "task": name, "dataset_path": "csv",
            "dataset_kwargs": {"data_files": {"test": str(test), "dev": str(samples / "ceval" / "dev" / f"{subject}_dev.csv")},
                               **csv_kwargs},
            "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "output_type": "multiple_choice",
            "description": f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
            "doc_to_text": "{{question.strip()}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\n答案：",
            "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "{{['A', 'B', 'C', 'D'].index(answer)}}",
            "target_delimiter": "", "fewshot_delimiter": "\n\n",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))
        names["sample_ceval"].append(name)
    arc = samples / "arc"
    (out / "llmkit_arc.yaml").write_text(_yaml({
        "task": "llmkit_arc", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(arc / "ARC-Sample-Test.jsonl"),
                                          "train": str(arc / "ARC-Sample-Train.jsonl")}},
        "test_split": "test", "fewshot_split": "train", "fewshot_config": {"sampler": "first_n"},
        "process_docs": "!function llmkit_utils.process_arc", "output_type": "multiple_choice",
        "doc_to_text": "{{query}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}",
        "target_delimiter": " ", "fewshot_delimiter": "\n\n",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}).replace(
            '"!function llmkit_utils.process_arc"', "!function llmkit_utils.process_arc"))
    names["sample_arc"].append("llmkit_arc")
    gsm = samples / "gsm8k"
    (out / "llmkit_gsm8k.yaml").write_text(_yaml({  # lm-eval's own gsm8k.yaml, on the local files
        "task": "llmkit_gsm8k", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(gsm / "test.jsonl"), "train": str(gsm / "train.jsonl")}},
        "test_split": "test", "fewshot_split": "train", "fewshot_config": {"sampler": "first_n"},
        "output_type": "generate_until", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}", "target_delimiter": " ", "fewshot_delimiter": "\n\n",
        "generation_kwargs": {"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0},
        "filter_list": [
            {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                                                {"function": "take_first"}]},
            {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1,
                                                     "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                                                    {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": False,
                         "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"]}]}))
    return names


def write_tokenizer_config(model_dir: Path, hf_dir: Path) -> None:
    """export_hf writes tokenizer.json only; transformers needs the special tokens named (lm-eval's hf model
    reads bos / eos from the tokenizer) - the same ids llmkit's tokenizer and generation_config use."""
    from llmkit.models.io import load_model_config
    from llmkit.tokenizer import Tokenizer

    tok = Tokenizer.load(model_dir)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(tok.add_bos_token),
           "model_max_length": load_model_config(model_dir)[0].block_size}
    for name, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id),
                    ("unk_token", getattr(tok, "unk_id", None))):
        if i is not None:
            cfg[name] = tok.id_to_token(i)
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def lm_eval_samples(out_dir: Path, task: str) -> list[dict]:
    files = sorted(out_dir.rglob(f"samples_{task}_*.jsonl"))
    return [json.loads(line) for f in files[-1:] for line in f.read_text(encoding="utf-8").splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="llmkit model dir (default: the tiny lab base, built if missing)")
    ap.add_argument("--lm-eval-python", default="/tmp/lmeval-venv/bin/python")
    ap.add_argument("--shots", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", default=None, help="scratch dir (default: a new temp dir)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--gsm8k-limit", type=int, default=0,
                    help="also compare greedy GSM8K generation on the first N problems (0: skip)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="GSM8K generation length, both harnesses")
    ap.add_argument("--multiple-choice", action=argparse.BooleanOptionalAction, default=True,
                    help="compare the multiple-choice sample tasks (--no-multiple-choice: GSM8K only)")
    args = ap.parse_args()

    from llmkit.eval.tasks import SAMPLES_DIR, load_task
    from llmkit.models.hf import export_hf

    model = Path(args.model) if args.model else None
    if model is None:
        from llmkit.lab.common import tiny_base_model

        model = tiny_base_model()
    work = Path(args.work or tempfile.mkdtemp(prefix="eval_vs_lm_eval_"))
    hf_dir = export_hf(model, work / "hf")
    write_tokenizer_config(model, hf_dir)
    load_task("sample_mmlu")  # writes data/eval_samples when missing
    names = write_task_yamls(work / "tasks", SAMPLES_DIR)

    report = {"model": str(model), "hf_export": str(hf_dir), "shots": args.shots, "tasks": {}}
    if args.multiple_choice:
        report.update(compare_multiple_choice(model, hf_dir, work, names, args))
    if args.gsm8k_limit:
        report["tasks"]["sample_gsm8k"] = compare_gsm8k(model, hf_dir, work, args)
    text = json.dumps(report, indent=1, ensure_ascii=False)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


def compare_multiple_choice(model: Path, hf_dir: Path, work: Path, names: dict[str, list[str]], args) -> dict:
    """acc / acc_norm of both harnesses on the multiple-choice sample tasks, and the largest per-choice
    log-likelihood difference."""
    from llmkit.eval.harness import EvalConfig, run_eval
    from llmkit.eval.tasks import load_task

    t0 = time.perf_counter()
    ours = run_eval(EvalConfig(model=str(model), tasks="sample_mmlu,sample_ceval,sample_arc", shots=args.shots,
                               batch_size=args.batch_size, cache_dir=str(work / "llmkit_cache")))
    t_ours = time.perf_counter() - t0
    out_dir = work / "lm_eval_out"
    cmd = [args.lm_eval_python, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={hf_dir},dtype=float32", "--device", "cpu",
           "--tasks", ",".join(n for v in names.values() for n in v), "--include_path", str(work / "tasks"),
           "--num_fewshot", str(args.shots), "--batch_size", str(args.batch_size), "--output_path", str(out_dir),
           "--log_samples"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"HF_DATASETS_OFFLINE": "1",
                                                                      "HF_HUB_OFFLINE": "1",
                                                                      "TOKENIZERS_PARALLELISM": "false",
                                                                      "PATH": "/usr/bin:/bin"})
    t_theirs = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"lm_eval failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    res_file = sorted(out_dir.rglob("results_*.json"))[-1]
    theirs = json.loads(res_file.read_text())["results"]

    report = {"seconds": {"llmkit": round(t_ours, 1), "lm_eval": round(t_theirs, 1)}, "tasks": {}}
    for task, lm_names in names.items():
        n_total, acc, acc_norm, max_diff, n_cmp = 0, 0.0, 0.0, 0.0, 0
        ours_rows = {}
        cache = ours["tasks"][task]["cache_file"]
        for line in Path(cache).read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            ours_rows[r["id"]] = r
        ours_order = [e.id for e in load_task(task).examples]
        for lm in lm_names:
            r = theirs[lm]
            n = len(lm_eval_samples(out_dir, lm))
            n_total += n
            acc += r["acc,none"] * n
            acc_norm += r["acc_norm,none"] * n
        # per-example log-likelihoods: lm-eval's samples in doc order, task by task, as llmkit's file order
        theirs_ll = [[float(x[0]) for x in s["filtered_resps"]]
                     for lm in lm_names for s in sorted(lm_eval_samples(out_dir, lm), key=lambda s: s["doc_id"])]
        for rid, lls in zip(ours_order, theirs_ll):
            mine = ours_rows[rid]["ll"]
            max_diff = max(max_diff, max(abs(a - b) for a, b in zip(mine, lls)))
            n_cmp += 1
        m = ours["tasks"][task]["metrics"]
        report["tasks"][task] = {
            "n": {"llmkit": ours["tasks"][task]["n"], "lm_eval": n_total},
            "acc": {"llmkit": m["acc"]["value"], "lm_eval": acc / n_total},
            "acc_norm": {"llmkit": m["acc_norm"]["value"], "lm_eval": acc_norm / n_total},
            "max_abs_loglikelihood_diff": max_diff, "examples_compared": n_cmp}
    return report


def compare_gsm8k(model: Path, hf_dir: Path, work: Path, args) -> dict:
    """Greedy GSM8K on the first `--gsm8k-limit` problems in both harnesses: exact match (strict, flexible) and
    how many generations are the same text after stripping surrounding whitespace."""
    from llmkit.eval.harness import EvalConfig, run_eval
    from llmkit.eval.tasks import load_task

    t0 = time.perf_counter()
    ours = run_eval(EvalConfig(model=str(model), tasks="sample_gsm8k", shots=args.shots, limit=args.gsm8k_limit,
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                               cache_dir=str(work / "llmkit_cache")))["tasks"]["sample_gsm8k"]
    t_ours = time.perf_counter() - t0
    out_dir = work / "lm_eval_gsm8k"
    cmd = [args.lm_eval_python, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={hf_dir},dtype=float32,max_length=2048", "--device", "cpu",
           "--tasks", "llmkit_gsm8k", "--include_path", str(work / "tasks"), "--num_fewshot", str(args.shots),
           "--batch_size", "1", "--limit", str(args.gsm8k_limit), "--output_path", str(out_dir), "--log_samples",
           "--gen_kwargs", f"max_gen_toks={args.max_new_tokens}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                                                                      "TOKENIZERS_PARALLELISM": "false",
                                                                      "PATH": "/usr/bin:/bin"})
    t_theirs = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"lm_eval (gsm8k) failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    theirs = json.loads(sorted(out_dir.rglob("results_*.json"))[-1].read_text())["results"]["llmkit_gsm8k"]
    by_doc = {s["doc_id"]: s for s in lm_eval_samples(out_dir, "llmkit_gsm8k")}  # one row per filter: keep one
    samples = [by_doc[d] for d in sorted(by_doc)]
    rows = {json.loads(line)["id"]: json.loads(line) for line in Path(ours["cache_file"]).read_text().splitlines()}
    order = [e.id for e in load_task("sample_gsm8k").examples][:args.gsm8k_limit]
    same = sum(rows[i]["output"].strip() == s["resps"][0][0].strip() for i, s in zip(order, samples))
    m = ours["metrics"]
    return {"n": {"llmkit": ours["n"], "lm_eval": len(samples)},
            "exact_match_strict": {"llmkit": m["exact_match_strict"]["value"],
                                   "lm_eval": theirs["exact_match,strict-match"]},
            "exact_match_flexible": {"llmkit": m["exact_match_flexible"]["value"],
                                     "lm_eval": theirs["exact_match,flexible-extract"]},
            "identical_generations": same, "seconds": {"llmkit": round(t_ours, 1), "lm_eval": round(t_theirs, 1)}}


if __name__ == "__main__":
    main()

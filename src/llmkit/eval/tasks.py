"""Task files: readers for the published layouts, the prompt formats those benchmarks use, named tasks.

Layouts (each row keeps `source` = "file:line" so a result or an error points back to it):

* ``mmlu``: headerless CSV rows ``question,A,B,C,D,answer``; files ``<subject>_test.csv`` (eval) and
  ``<subject>_dev.csv`` (few-shot), in a directory (searched recursively) or one file; subject from the name.
* ``ceval``: CSV with a header ``id,question,A,B,C,D,answer[,explanation]``; ``<subject>_val.csv`` /
  ``<subject>_test.csv`` (eval) and ``<subject>_dev.csv`` (few-shot).
* ``cmmlu``: CSV with a header ``[id],Question,A,B,C,D,Answer``; ``test/<subject>.csv`` and
  ``dev/<subject>.csv``.
* ``arc``: JSON lines ``{"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"}``.
* ``hellaswag``: JSON lines ``{"ctx", "endings": [4], "label"}`` (``activity_label`` used when present).
* ``gsm8k``: JSON lines ``{"question", "answer"}``, the answer's last line ``#### N``.
* ``ppl``: any text: ``.txt`` (the whole file), ``.jsonl`` (field ``text``), ``.parquet`` (column ``text``).

CSV / JSON lines / parquet (parquet only when pyarrow or pandas is importable). A row that does not fit its
layout is recorded as a `Malformed` (file, line, reason), counted in the results, never silently dropped.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

LETTERS = "ABCDEFGHIJ"
SAMPLES_DIR = Path(__file__).resolve().parents[3] / "data" / "eval_samples"

NAMED_TASKS: dict[str, tuple[str, str]] = {
    "sample_mmlu": ("mmlu", "mmlu"),
    "sample_ceval": ("ceval", "ceval"),
    "sample_arc": ("arc", "arc"),
    "sample_gsm8k": ("gsm8k", "gsm8k"),
    "sample_ppl_en": ("ppl", "ppl/en.txt"),
}
"""Offline named tasks: name -> (layout, path under data/eval_samples)."""
KINDS = ("mmlu", "ceval", "cmmlu", "arc", "hellaswag", "gsm8k", "ppl")


class TaskError(ValueError):
    """An unknown task name or an unreadable task file (the message names it)."""


@dataclass
class Malformed:
    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


@dataclass
class Example:
    id: str
    """Stable within the task file: "<relative file>:<line>"."""
    source: str
    subject: str = ""
    question: str = ""
    choices: list[str] = field(default_factory=list)
    gold: int | str = 0
    """Index of the right choice (multiple choice) or the reference number as a string (gsm8k)."""
    text: str = ""
    """ppl: the document; gsm8k: the worked answer (few-shot targets)."""
    subject_name: str = ""
    """How the prompt header names the subject (from subject_mapping.json); "" = the file name's words."""


@dataclass
class Task:
    name: str
    kind: str
    path: Path
    examples: list[Example]
    fewshot: dict[str, list[Example]]
    """Few-shot pool per subject ("" for sets without subjects)."""
    malformed: list[Malformed]
    files: list[Path]
    categories: dict[str, str] = field(default_factory=dict)
    """Subject -> category (C-Eval's STEM / Social Science / Humanities / Other), from subject_mapping.json."""

    def digest(self) -> str:
        """sha256 over the task's files (relative names and bytes)."""
        h = hashlib.sha256()
        for f in sorted(self.files):
            h.update(str(f.relative_to(self.path) if f.is_relative_to(self.path) and f != self.path
                         else f.name).encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
        return h.hexdigest()


def parse_task_spec(spec: str) -> tuple[str, str, Path]:
    """"sample_mmlu" -> (name, kind, path); "mmlu:/data/mmlu" -> ("mmlu", "mmlu", path); "arc:F" likewise."""
    spec = spec.strip()
    if spec in NAMED_TASKS:
        kind, rel = NAMED_TASKS[spec]
        if not (SAMPLES_DIR / rel).exists():  # the files are generated, deterministically, by make_samples
            from llmkit.eval.make_samples import write_all

            write_all(SAMPLES_DIR)
        return spec, kind, SAMPLES_DIR / rel
    if ":" in spec:
        kind, path = spec.split(":", 1)
        if kind not in KINDS:
            raise TaskError(f"task {spec!r}: unknown layout {kind!r} (layouts: {', '.join(KINDS)})")
        p = Path(path).expanduser()
        if not p.exists():
            raise TaskError(f"task {spec!r}: {p} does not exist")
        return f"{kind}:{p.name}", kind, p
    raise TaskError(f"unknown task {spec!r}: named tasks are {', '.join(NAMED_TASKS)}; a task file or dir is "
                    f"given as LAYOUT:PATH with LAYOUT one of {', '.join(KINDS)}")


# -- reading -------------------------------------------------------------------------------------------

def _rows_csv(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each CSV record (line = where the record starts)."""
    text = path.read_text(encoding="utf-8-sig")
    reader = csv.reader(io.StringIO(text, newline=""))
    out = []
    line = 1
    for row in reader:
        out.append((line, row))
        line = reader.line_num + 1
    return [(n, r) for n, r in out if any(c.strip() for c in r)]


def _rows_json(path: Path) -> list[tuple[int, dict | str]]:
    """(line, record) for .jsonl / .json lines, or (row index + 1, record) for parquet; a bad line is a str."""
    if path.suffix == ".parquet":
        return [(i + 1, r) for i, r in enumerate(_read_parquet(path))]
    out: list[tuple[int, dict | str]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            out.append((n, f"not valid JSON ({e.msg})"))
            continue
        out.append((n, rec if isinstance(rec, dict) else f"expected a JSON object, got {type(rec).__name__}"))
    return out


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except ImportError:
        pass
    try:
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    except ImportError:
        raise TaskError(f"{path}: reading parquet needs pyarrow or pandas, neither is installed; "
                        "convert it to JSON lines or CSV") from None


def _mc_from_fields(fields: list[str], answer: str, src: str, subject: str, rid: str,
                    bad: list[Malformed]) -> Example | None:
    question, choices = fields[0], fields[1:]
    answer = answer.strip().upper()
    if not question.strip() or any(not c.strip() for c in choices):
        bad.append(Malformed(src, "empty question or choice"))
        return None
    if len(answer) != 1 or answer not in LETTERS[:len(choices)]:
        bad.append(Malformed(src, f"answer {answer!r} is not one of {', '.join(LETTERS[:len(choices)])}"))
        return None
    return Example(id=rid, source=src, subject=subject, question=question, choices=choices,
                   gold=LETTERS.index(answer))


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root)) if root.is_dir() else path.name


def read_mmlu_file(path: Path, root: Path, subject: str, bad: list[Malformed]) -> list[Example]:
    out = []
    for n, row in _rows_csv(path):
        src = f"{path}:{n}"
        if len(row) != 6:
            bad.append(Malformed(src, f"expected 6 fields (question,A,B,C,D,answer), got {len(row)}"))
            continue
        ex = _mc_from_fields(row[:5], row[5], src, subject, f"{_rel(path, root)}:{n}", bad)
        if ex:
            out.append(ex)
    return out


def read_ceval_file(path: Path, root: Path, subject: str, bad: list[Malformed]) -> list[Example]:
    """C-Eval (id,question,A,B,C,D,answer[,explanation]) and CMMLU ([id],Question,A,B,C,D,Answer) CSVs."""
    rows = _rows_csv(path)
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0][1]]
    need = ["question", "a", "b", "c", "d", "answer"]
    if not all(k in header for k in need):
        bad.append(Malformed(f"{path}:{rows[0][0]}", f"header {rows[0][1]} lacks one of question,A,B,C,D,answer"))
        return []
    idx = [header.index(k) for k in need]
    out = []
    for n, row in rows[1:]:
        src = f"{path}:{n}"
        if len(row) != len(header):
            bad.append(Malformed(src, f"expected {len(header)} fields as the header, got {len(row)}"))
            continue
        vals = [row[i] for i in idx]
        ex = _mc_from_fields(vals[:5], vals[5], src, subject, f"{_rel(path, root)}:{n}", bad)
        if ex:
            out.append(ex)
    return out


def read_arc_file(path: Path, root: Path, bad: list[Malformed]) -> list[Example]:
    out = []
    for n, rec in _rows_json(path):
        src = f"{path}:{n}"
        if isinstance(rec, str):
            bad.append(Malformed(src, rec))
            continue
        try:
            q = rec["question"]
            stem, choices = q["stem"], q["choices"]
            if isinstance(choices, dict):  # the HF datasets layout: {"text": [...], "label": [...]}
                texts, labels = list(choices["text"]), list(choices["label"])
            else:
                texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
            key = str(rec["answerKey"]).strip()
        except (KeyError, TypeError) as e:
            bad.append(Malformed(src, f"missing field {e} (need question.stem, question.choices text/label, answerKey)"))
            continue
        labels = [str(label).strip() for label in labels]
        problem = ("an empty question stem" if not str(stem).strip() else
                   f"{len(texts)} choice(s), need 2 or more" if len(texts) < 2 else
                   f"answerKey {key!r} not among the labels {labels}" if key not in labels else None)
        if problem:
            bad.append(Malformed(src, problem))
            continue
        out.append(Example(id=f"{_rel(path, root)}:{n}", source=src, question=str(stem), choices=[str(t) for t in texts],
                           gold=labels.index(key)))
    return out


def _hellaswag_clean(text: str) -> str:
    """lm-evaluation-harness's hellaswag `preprocess`."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag_file(path: Path, root: Path, bad: list[Malformed]) -> list[Example]:
    out = []
    for n, rec in _rows_json(path):
        src = f"{path}:{n}"
        if isinstance(rec, str):
            bad.append(Malformed(src, rec))
            continue
        try:
            if "ctx_a" in rec and "ctx_b" in rec:
                ctx = rec["ctx_a"] + " " + str(rec["ctx_b"]).capitalize()
            else:
                ctx = rec["ctx"]
            endings, label = list(rec["endings"]), int(rec["label"])
        except (KeyError, TypeError, ValueError) as e:
            bad.append(Malformed(src, f"bad or missing field ({e}); need ctx, endings, label"))
            continue
        if not 0 <= label < len(endings):
            bad.append(Malformed(src, f"label {label} out of range for {len(endings)} endings"))
            continue
        label_prefix = f"{rec['activity_label']}: " if rec.get("activity_label") else ""
        out.append(Example(id=f"{_rel(path, root)}:{n}", source=src, question=_hellaswag_clean(label_prefix + ctx),
                           choices=[_hellaswag_clean(str(e)) for e in endings], gold=label))
    return out


GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def read_gsm8k_file(path: Path, root: Path, bad: list[Malformed]) -> list[Example]:
    out = []
    for n, rec in _rows_json(path):
        src = f"{path}:{n}"
        if isinstance(rec, str):
            bad.append(Malformed(src, rec))
            continue
        q, a = rec.get("question"), rec.get("answer")
        if not isinstance(q, str) or not isinstance(a, str) or not q.strip():
            bad.append(Malformed(src, "need string fields question and answer"))
            continue
        m = GSM8K_STRICT.search(a)
        if m is None:
            bad.append(Malformed(src, "answer does not end with '#### N'"))
            continue
        out.append(Example(id=f"{_rel(path, root)}:{n}", source=src, question=q, text=a,
                           gold=normalize_number(m.group(1))))
    return out


def read_ppl_file(path: Path, root: Path, bad: list[Malformed]) -> list[Example]:
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        return [Example(id=f"{_rel(path, root)}:1", source=f"{path}:1", text=text)] if text else []
    out = []
    for n, rec in _rows_json(path):
        src = f"{path}:{n}"
        if isinstance(rec, str) or not isinstance(rec.get("text"), str):
            bad.append(Malformed(src, rec if isinstance(rec, str) else "need a string field text"))
            continue
        if rec["text"]:
            out.append(Example(id=f"{_rel(path, root)}:{n}", source=src, text=rec["text"]))
    return out


def normalize_number(s: str) -> str:
    """lm-eval's gsm8k exact-match normalisation (regexes_to_ignore ",", "\\$", "(?s).*#### ", "\\.$"):
    commas, '$', anything up to '#### ' and one trailing '.' dropped; nothing else ("5.00" stays)."""
    s = re.sub(r"(?s).*#### ", "", s.replace(",", "").replace("$", ""))
    return re.sub(r"\.$", "", s.strip())


def _split_files(root: Path, kind: str) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """(eval files, few-shot files), each with its subject."""
    if root.is_file():
        return [(root, _subject(root, kind))], []
    exts = {"mmlu": (".csv",), "ceval": (".csv",), "cmmlu": (".csv",)}.get(
        kind, (".jsonl", ".json", ".parquet", ".txt") if kind == "ppl" else (".jsonl", ".json", ".parquet"))
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in exts)
    if not files:
        raise TaskError(f"{root}: no {'/'.join(exts)} files for layout {kind}")
    fewshot = [p for p in files if re.search(r"(^|[_/\-.])(dev|train)([_\-./]|$)", str(p.relative_to(root)).lower())]
    evals = [p for p in files if p not in fewshot]
    for split in ("test", "val", "validation"):  # prefer test, else val, when both are present
        chosen = [p for p in evals if re.search(rf"(^|[_/\-.]){split}([_\-./]|$)", str(p.relative_to(root)).lower())]
        if chosen:
            evals = chosen
            break
    return [(p, _subject(p, kind)) for p in evals], [(p, _subject(p, kind)) for p in fewshot]


def _subject(path: Path, kind: str) -> str:
    if kind not in ("mmlu", "ceval", "cmmlu"):
        return ""
    return re.sub(r"_(test|dev|val|validation|train)$", "", path.stem)


SUBJECT_MAPPING = "subject_mapping.json"


def read_subject_mapping(path: Path, kind: str) -> tuple[dict[str, str], dict[str, str]]:
    """(subject -> name for the prompt, subject -> category) from C-Eval's subject_mapping.json
    (`{"computer_network": ["Computer Network", "计算机网络", "STEM"], ...}`; a plain string value is the name).
    C-Eval and CMMLU prompts take the Chinese name, MMLU the English one."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TaskError(f"{path}: not a readable JSON object ({e})") from e
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: expected an object subject -> [english, chinese, category]")
    names, categories = {}, {}
    for subject, value in raw.items():
        if isinstance(value, str):
            names[subject] = value
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            names[subject] = value[0] if kind == "mmlu" or len(value) < 2 else value[1]
            if len(value) >= 3:
                categories[subject] = value[2]
        else:
            raise TaskError(f"{path}: subject {subject!r}: expected a name or [english, chinese, category], "
                            f"got {value!r}")
    return names, categories


def load_task(spec: str) -> Task:
    name, kind, root = parse_task_spec(spec)
    if not root.exists():
        raise TaskError(f"task {name}: {root} does not exist")
    evals, shots = _split_files(root, kind)
    bad: list[Malformed] = []
    mapping = (root if root.is_dir() else root.parent) / SUBJECT_MAPPING
    names, categories = ({}, {})
    if kind in ("mmlu", "ceval", "cmmlu") and mapping.is_file():
        names, categories = read_subject_mapping(mapping, kind)

    def read(p: Path, subject: str) -> list[Example]:
        if kind == "mmlu":
            rows = read_mmlu_file(p, root, subject, bad)
        elif kind in ("ceval", "cmmlu"):
            rows = read_ceval_file(p, root, subject, bad)
        else:
            return {"arc": read_arc_file, "hellaswag": read_hellaswag_file, "gsm8k": read_gsm8k_file,
                    "ppl": read_ppl_file}[kind](p, root, bad)
        for ex in rows:
            ex.subject_name = names.get(subject, "")
        return rows

    examples = [e for p, s in evals for e in read(p, s)]
    pool: dict[str, list[Example]] = {}
    for p, s in shots:
        pool.setdefault(s, []).extend(read(p, s))
    files = [p for p, _ in evals + shots] + ([mapping] if names else [])
    return Task(name=name, kind=kind, path=root, examples=examples, fewshot=pool, malformed=bad, files=files,
                categories=categories)


# -- prompt formats ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptFormat:
    """How a layout's examples become text: the published format of each benchmark."""

    name: str
    description: str
    """Header before the shots ("{subject}" is filled in)."""
    delimiter: str
    """Between the prompt and the continuation that is scored."""
    fewshot_sep: str
    choices_are_letters: bool


FORMATS = {
    # Hendrycks et al. (hendrycks/test evaluate.py) and lm-eval's mmlu default
    "mmlu": PromptFormat("mmlu", "The following are multiple choice questions (with answers) about {subject}.\n\n",
                         " ", "\n\n", True),
    # C-Eval's official evaluator (hkust-nlp/ceval): answer letter right after "答案："
    "ceval": PromptFormat("ceval", "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "", "\n\n", True),
    # CMMLU's official evaluator (haonan-li/CMMLU): "题目：" before, the letter right after "答案是："
    "cmmlu": PromptFormat("cmmlu", "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", "", "\n\n", True),
    # lm-eval arc_easy / arc_challenge
    "arc": PromptFormat("arc", "", " ", "\n\n", False),
    # lm-eval hellaswag
    "hellaswag": PromptFormat("hellaswag", "", " ", "\n\n", False),
    # lm-eval gsm8k
    "gsm8k": PromptFormat("gsm8k", "", " ", "\n\n", False),
}


def question_text(kind: str, ex: Example) -> str:
    """The example without its answer, ending where the continuation starts."""
    if kind == "mmlu":
        opts = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(ex.choices))
        return f"{ex.question.strip()}{opts}\nAnswer:"
    if kind == "ceval":
        opts = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(ex.choices))
        return f"{ex.question.strip()}{opts}\n答案："
    if kind == "cmmlu":
        opts = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(ex.choices))
        return f"题目：{ex.question.strip()}{opts}\n答案是："
    if kind == "arc":
        return f"Question: {ex.question}\nAnswer:"
    if kind == "hellaswag":
        return ex.question
    if kind == "gsm8k":
        return f"Question: {ex.question}\nAnswer:"
    raise ValueError(kind)


def choice_texts(kind: str, ex: Example) -> list[str]:
    """What is scored per choice (without the delimiter): the letters for MMLU-style sets, else the texts."""
    return list(LETTERS[:len(ex.choices)]) if FORMATS[kind].choices_are_letters else list(ex.choices)


def target_text(kind: str, ex: Example) -> str:
    """The answer of a few-shot example, as written after the delimiter."""
    if kind == "gsm8k":
        return ex.text
    return choice_texts(kind, ex)[int(ex.gold)]


def pretty_subject(subject: str) -> str:
    return subject.replace("_", " ")


def build_prompt(kind: str, ex: Example, shots: list[Example]) -> str:
    """Header + k solved examples + the question, exactly in the benchmark's published layout."""
    fmt = FORMATS[kind]
    head = fmt.description.format(subject=ex.subject_name or pretty_subject(ex.subject)) if fmt.description else ""
    solved = "".join(f"{question_text(kind, s)}{fmt.delimiter}{target_text(kind, s)}{fmt.fewshot_sep}" for s in shots)
    return head + solved + question_text(kind, ex)


def fewshot_for(task: Task, ex: Example, k: int) -> list[Example]:
    """The first k examples of the dev/train pool of `ex`'s subject; without a pool, the first k other
    examples of the eval set itself (never `ex`)."""
    if k <= 0:
        return []
    pool = task.fewshot.get(ex.subject) or task.fewshot.get("")
    if not pool:
        pool = [e for e in task.examples if e.subject == ex.subject]
    return [e for e in pool if e.id != ex.id][:k]

"""§1.1: augmentation (back-translation, synonym replacement) gives +8-12% few-shot accuracy.

A few-shot text classification task with real labels: which corpus does a sentence come from,
Wikipedia (encyclopedia), C4 (web pages), the alpaca demo answers (assistant responses) or
tinyshakespeare (literature)? k labelled
sentences per class are drawn, a small bag-of-words classifier (fastText style: mean of word embeddings,
linear layer; and multinomial naive Bayes) is trained from scratch on them, with and without augmentation
from `llmkit.data.augment`:

* none: the k x 3 originals;
* SR: + 16 synonym-replacement copies of each (EDA SR, alpha 0.1, WordNet 3.0 synonyms);
* EDA: + 16 copies, each made by one of the four EDA operations (SR, RI, RS, RD; alpha 0.1).

Accuracy is taken on 200 held-out sentences per class; each seed averages several few-shot draws.
Back-translation needs two translation models and none is available offline, so only the
synonym-based half of the claim is measured.
"""

from __future__ import annotations

import random
import re
import statistics

from llmkit.lab.claim import Claim, ExperimentContext, Measurement, Result
from llmkit.lab.experiments.lora_lr import data_file
from llmkit.lab.plots import save_png, subplots

N_AUG = 16
ALPHA = 0.1
TEST_PER_CLASS = 200


def sentences(text: str) -> list[str]:
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = " ".join(s.split())
        if 8 <= len(s.split()) <= 40:
            out.append(s)
    return out


def load_task() -> dict[str, list[str]]:
    """{label: unique sentences} from the three corpora."""
    import json

    from llmkit.tokenizer import iter_texts

    wiki = [s for t in iter_texts(data_file("en/wiki_demo.txt")) for s in sentences(t)]
    web = [s for t in iter_texts(data_file("en/c4_demo.jsonl")) for s in sentences(t)]
    records = json.loads(data_file("instruct/alpaca_en_demo.json").read_text(encoding="utf-8"))
    answers = [s for r in records for s in sentences(r.get("output", ""))]
    plays = data_file("en/tinyshakespeare.txt").read_text(encoding="utf-8")
    verse = "\n".join(line for line in plays.splitlines() if not line.rstrip().endswith(":"))  # drop speaker names
    task = {"encyclopedia": wiki, "web": web, "assistant": answers, "literature": sentences(verse)}
    seen: set[str] = set()
    for label in task:  # a sentence found in two corpora would have two labels: drop repeats
        task[label] = [s for s in dict.fromkeys(task[label]) if not (s in seen or seen.add(s))]
    return task


def augment(text: str, rng: random.Random, synonyms: dict, method: str) -> list[str]:
    from llmkit.data.augment import random_delete, random_insert, random_swap, synonym_replace

    out = []
    for i in range(N_AUG):
        op = "sr" if method == "sr" else ("sr", "ri", "rs", "rd")[i % 4]
        if op == "sr":
            out.append(synonym_replace(text, rng, synonyms, alpha=ALPHA))
        elif op == "ri":
            out.append(random_insert(text, rng, synonyms, alpha=ALPHA))
        elif op == "rs":
            out.append(random_swap(text, rng, alpha=ALPHA))
        else:
            out.append(random_delete(text, rng, p=ALPHA))
    return out


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def train_eval(train: list[tuple[str, int]], test: list[tuple[str, int]], n_labels: int, seed: int,
               epochs: int) -> float:
    """Accuracy of a mean-of-word-embeddings classifier trained from scratch (full batch Adam)."""
    import torch

    vocab: dict[str, int] = {}
    for t, _ in train:
        for w in words(t):
            vocab.setdefault(w, len(vocab) + 1)  # 0: padding / unknown

    def encode(rows):
        ids = [[vocab.get(w, 0) for w in words(t)] or [0] for t, _ in rows]
        width = max(len(r) for r in ids)
        x = torch.tensor([r + [0] * (width - len(r)) for r in ids])
        return x, torch.tensor([y for _, y in rows])

    torch.manual_seed(seed)
    emb = torch.nn.EmbeddingBag(len(vocab) + 1, 32, mode="mean", padding_idx=0)
    head = torch.nn.Linear(32, n_labels)
    params = [*emb.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=0.02, weight_decay=1e-4)
    x, y = encode(train)
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(emb(x)), y)
        loss.backward()
        opt.step()
    xt, yt = encode(test)
    with torch.no_grad():
        return (head(emb(xt)).argmax(-1) == yt).float().mean().item()


def naive_bayes(train: list[tuple[str, int]], test: list[tuple[str, int]], n_labels: int) -> float:
    """Accuracy of multinomial naive Bayes with add-one smoothing (the classic few-shot text baseline)."""
    import math
    from collections import Counter

    counts = [Counter() for _ in range(n_labels)]
    prior = Counter(y for _, y in train)
    for t, y in train:
        counts[y].update(words(t))
    vocab = len(set().union(*counts)) + 1
    totals = [sum(c.values()) for c in counts]

    def score(text: str, y: int) -> float:
        return math.log(prior[y] / len(train)) + sum(math.log((counts[y][w] + 1) / (totals[y] + vocab))
                                                     for w in words(text))

    return statistics.fmean(float(max(range(n_labels), key=lambda y: score(t, y)) == gold) for t, gold in test)


def verdict(sr_gain_points: list[float], sr_gain_relative: float, best_gain_anywhere: float) -> tuple[str, str]:
    """(verdict, reason) from synonym replacement's per-seed accuracy gain at 8 shots (points), its mean
    relative gain (%) and the best mean gain of any method at any shot count (points). 'holds' = 8-12
    points or 8-12% (or above 12 but not beyond noise); 'partly' = a gain beyond 2 standard errors of at
    least 4 points or 4%, or the guide's size somewhere else."""
    if not sr_gain_points:
        return "not measured", "no seed ran"
    pts = statistics.fmean(sr_gain_points)
    se = statistics.stdev(sr_gain_points) / len(sr_gain_points) ** 0.5 if len(sr_gain_points) > 1 else 0.0
    rl = sr_gain_relative
    if 8.0 <= pts <= 12.0 or 8.0 <= rl <= 12.0 or (pts > 12.0 and pts - 2 * se <= 12.0):
        return "holds", f"synonym replacement gains {pts:+.1f} points ({rl:+.1f}%)"
    if (pts > 2 * se and (pts >= 4.0 or rl >= 4.0)) or best_gain_anywhere >= 8.0:
        return "partly holds", (f"synonym replacement gains {pts:+.1f} points ({rl:+.1f}%), best gain anywhere "
                                f"{best_gain_anywhere:+.1f} points")
    return "does not hold", f"synonym replacement gains {pts:+.1f} ± {se:.1f} points ({rl:+.1f}%)"


def run(ctx: ExperimentContext) -> Result:
    import torch

    from llmkit.data.synonyms import load_wordnet

    shots = [8] if ctx.quick else [4, 8, 16, 32]
    draws = 1 if ctx.quick else 8
    n_test = 50 if ctx.quick else TEST_PER_CLASS
    epochs = 30 if ctx.quick else 60
    synonyms = load_wordnet()
    task = load_task()
    labels = sorted(task)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    acc: dict[tuple[int, str], list[float]] = {(k, m): [] for k in shots for m in ("none", "sr", "eda")}
    nb: dict[tuple[int, str], list[float]] = {(k, m): [] for k in shots for m in ("none", "sr", "eda")}
    try:
        for seed in ctx.seeds:
            rng = random.Random(seed)
            per = {k: {m: [] for m in ("none", "sr", "eda")} for k in shots}
            per_nb = {k: {m: [] for m in ("none", "sr", "eda")} for k in shots}
            for d in range(draws):
                pools = {lab: rng.sample(task[lab], len(task[lab])) for lab in labels}
                test = [(s, i) for i, lab in enumerate(labels) for s in pools[lab][:n_test]]
                for k in shots:
                    train = [(s, i) for i, lab in enumerate(labels)
                             for s in pools[lab][n_test:n_test + k]]
                    for m in ("none", "sr", "eda"):
                        rows = list(train)
                        if m != "none":
                            arng = random.Random(f"{seed}-{d}-{k}-{m}")
                            rows += [(a, y) for t, y in train for a in augment(t, arng, synonyms, m)]
                        per[k][m].append(train_eval(rows, test, len(labels), seed * 100 + d, epochs))
                        per_nb[k][m].append(naive_bayes(rows, test, len(labels)))
            for k in shots:
                for m in ("none", "sr", "eda"):
                    acc[(k, m)].append(100.0 * statistics.fmean(per[k][m]))
                    nb[(k, m)].append(100.0 * statistics.fmean(per_nb[k][m]))
    finally:
        torch.set_num_threads(threads)

    def gain(k: int, m: str) -> list[float]:
        return [a - b for a, b in zip(acc[(k, m)], acc[(k, "none")])]

    def rel(k: int, m: str) -> list[float]:
        return [100.0 * (a - b) / b for a, b in zip(acc[(k, m)], acc[(k, "none")])]

    k0 = 8
    pts, rl = statistics.fmean(gain(k0, "sr")), statistics.fmean(rel(k0, "sr"))
    g = gain(k0, "sr")
    se = statistics.stdev(g) / len(g) ** 0.5 if len(g) > 1 else 0.0
    def nb_gain(k: int, m: str) -> list[float]:
        return [a - b for a, b in zip(nb[(k, m)], nb[(k, "none")])]

    best_any = max(max(statistics.fmean(gain(k, m)), statistics.fmean(nb_gain(k, m)))
                   for k in shots for m in ("sr", "eda"))
    verdict_, _ = verdict(g, rl, best_any)

    plots = []
    fig, ax = subplots(figsize=(5.5, 3.5))
    for m, color, name in (("none", "0.4", "no augmentation"), ("sr", "tab:blue", "+ synonym replacement"),
                           ("eda", "tab:green", "+ EDA (SR, RI, RS, RD)")):
        means = [statistics.fmean(acc[(k, m)]) for k in shots]
        errs = [statistics.stdev(acc[(k, m)]) if len(acc[(k, m)]) > 1 else 0 for k in shots]
        ax.errorbar(shots, means, yerr=errs, fmt="o-", color=color, capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("labelled examples per class")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("4-way source classification (wiki / web / assistant / plays)", fontsize=9)
    ax.legend(fontsize=8)
    plots.append(save_png(fig, ctx.out_dir, "augment.png"))

    ms = [Measurement(f"accuracy gain of synonym replacement, {k0} shots/class", gain(k0, "sr"), "points", "+8-12%"),
          Measurement(f"relative accuracy gain of synonym replacement, {k0} shots/class", rel(k0, "sr"), "%", "+8-12%")]
    for k in shots:
        ms.append(Measurement(f"accuracy, no augmentation, {k} shots/class", acc[(k, "none")], "%"))
        ms.append(Measurement(f"accuracy gain of SR, {k} shots/class", gain(k, "sr"), "points"))
        ms.append(Measurement(f"accuracy gain of EDA, {k} shots/class", gain(k, "eda"), "points"))
    for k in shots:
        ms.append(Measurement(f"naive Bayes accuracy, no augmentation, {k} shots/class", nb[(k, "none")], "%"))
        ms.append(Measurement(f"naive Bayes accuracy gain of SR, {k} shots/class", nb_gain(k, "sr"), "points"))
        ms.append(Measurement(f"naive Bayes accuracy gain of EDA, {k} shots/class", nb_gain(k, "eda"), "points"))
    base_acc = statistics.fmean(acc[(k0, "none")])
    eda_pts = statistics.fmean(gain(k0, "eda"))
    nb_pts = statistics.fmean(nb_gain(k0, "sr"))
    return Result(
        measurements=ms,
        verdict=verdict_,
        summary=(f"with {k0} labelled sentences per class, synonym replacement moves accuracy from {base_acc:.1f}% by "
                 f"{pts:+.1f} ± {se:.1f} points ({rl:+.1f}% relative; all four EDA operations {eda_pts:+.1f} points; "
                 f"with naive Bayes {nb_pts:+.1f} points; best gain over all k, methods and classifiers "
                 f"{best_any:+.1f}) "
                 "against the guide's +8-12%: "
                 + {"holds": "a gain of the guide's size",
                    "partly holds": "a real gain of at least half the guide's size, or the guide's size only at "
                                    "another few-shot size or with all four EDA operations",
                    "does not hold": "far smaller than the guide's figure (below 4 points and 4%) or within noise"}[verdict_]
                 + "; back-translation was not measured (no translation model offline)."),
        setup=(f"4-way sentence source classification (wiki_demo / c4_demo / alpaca_en_demo answers / tinyshakespeare, sentences of 8-40 "
               f"words, {n_test} held-out per class); k = {', '.join(map(str, shots))} training sentences per "
               f"class; classifier: mean of 32-d word embeddings + linear, from scratch, full-batch Adam lr 0.02, "
               f"{epochs} epochs (and multinomial naive Bayes, add-one); augmentation: {N_AUG} copies per sentence, alpha {ALPHA}, WordNet 3.0 synonyms "
               f"(llmkit.data.augment); each seed averages {draws} few-shot draws; 'holds' = SR gain at k {k0} of 8-12 "
               "(points or relative %), 'partly' = a gain > 2 standard errors of at least 4 points or 4%, or >= 8 "
               "points for another k or EDA."),
        plots=plots,
    )


CLAIM = Claim(
    id="augment",
    section="§1.1",
    guide_zh="数据增强:通过回译(Back Translation)、同义词替换等技术扩充数据多样性。实验表明,适度增强可使模型在少样本任务上的准确率提升8-12%。",
    guide_en="Data augmentation: enlarge data diversity with back-translation, synonym replacement and similar "
             "techniques. Experiments show that moderate augmentation raises accuracy on few-shot tasks by 8-12%.",
    claimed="+8-12% few-shot accuracy",
    run=run,
    minutes=2.5,
)

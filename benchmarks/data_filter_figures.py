"""The quality-rule pass rates and character perplexity ranges quoted in docs/data.md, on ../shared/data.

    python benchmarks/data_filter_figures.py      # prints one JSON object (~1 minute on 2 cores)

Quality: `check_quality` with the default rules, after `normalize_text`, on every document of each source
(Wikipedia = the non-empty lines of en/wiki_demo.txt, C4 = en/c4_demo.jsonl, Tang poems =
zh/tangshisanbaishou.json, 古文观止 = zh/guwenguanzhi.json, alpaca_zh = the `output` of each record of
instruct/alpaca_zh_demo.json): share kept and the rules that dropped the rest.
Perplexity: the data pipeline's default scorer (character 5-gram `NgramLM`) trained on the trusted sources
of benchmarks/data_pipeline.py (Wikipedia + 古文观止), scoring documents it was not trained on: C4 web
text, the same C4 texts with their words shuffled and with their characters shuffled (seed 0), Tang poems and alpaca_zh answers. Percentiles
5 / 50 / 95 of each, and the share of C4 above the guide's token-level "15" used as a character cut.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def need(rel: str) -> Path:
    path = SHARED / rel
    if not path.is_file():
        sys.exit(f"{path} not found: this benchmark reads the sample corpora of ../shared/data")
    return path


def zh_docs(rel: str) -> list[str]:
    data = json.loads(need(rel).read_text(encoding="utf-8"))
    if isinstance(data, dict):
        data = [p for section in data["content"] for p in section["content"]]
    return ["\n".join(p["paragraphs"]) for p in data]


def main() -> None:
    from llmkit.data.ngram_lm import NgramLM
    from llmkit.data.normalize import normalize_text
    from llmkit.data.quality import check_quality

    c4 = [json.loads(line)["text"] for line in need("en/c4_demo.jsonl").open(encoding="utf-8") if line.strip()]
    wiki = [line for line in need("en/wiki_demo.txt").open(encoding="utf-8") if line.strip()]
    poems = zh_docs("zh/tangshisanbaishou.json")
    prose = zh_docs("zh/guwenguanzhi.json")
    alpaca_zh = [r["output"] for r in json.loads(need("instruct/alpaca_zh_demo.json").read_text(encoding="utf-8"))]
    sources = {"wikipedia": (wiki, "en"), "c4": (c4, "en"), "tang_poems": (poems, "zh"),
               "guwenguanzhi": (prose, "zh"), "alpaca_zh_answers": (alpaca_zh, "zh")}
    out: dict = {"quality_pass_rate": {}, "perplexity": {}}
    for name, (docs, lang) in sources.items():
        verdicts = Counter(check_quality(normalize_text(t), lang) for t in docs)
        kept = verdicts.pop(None, 0)
        out["quality_pass_rate"][name] = {"docs": len(docs), "kept": kept, "pass_rate": round(kept / len(docs), 3),
                                          "dropped_by": dict(verdicts.most_common())}

    model = NgramLM.train([normalize_text(t) for t in wiki + prose], order=5, unit="char")
    rng = random.Random(0)

    def shuffled(text: str) -> str:
        words = text.split()
        rng.shuffle(words)
        return " ".join(words)

    def char_shuffled(text: str) -> str:
        chars = list(text)
        rng.shuffle(chars)
        return "".join(chars)

    scored = {"c4": c4, "c4_words_shuffled": [shuffled(t) for t in c4],
              "c4_chars_shuffled": [char_shuffled(t) for t in c4], "tang_poems": poems,
              "alpaca_zh_answers": alpaca_zh}
    out["perplexity"]["scorer"] = {"kind": "ngram", "order": 5, "unit": "char", "trained_on": "wikipedia + guwenguanzhi",
                                   "vocab_chars": len(model.vocab)}
    for name, docs in scored.items():
        ppl = model.perplexities([normalize_text(t) for t in docs])
        out["perplexity"][name] = {"docs": len(docs), **{f"p{q}": round(float(np.percentile(ppl, q)), 1)
                                                        for q in (5, 50, 95)}}
    c4_ppl = model.perplexities([normalize_text(t) for t in c4])
    out["perplexity"]["c4_share_above_15"] = round(float(np.mean(c4_ppl > 15)), 3)
    print(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()

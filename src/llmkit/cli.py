"""`llmkit <stage> ...`: parses arguments and hands off to the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from llmkit.config import ConfigError
from llmkit.data.samples import FetchError


def _samples(args) -> None:
    from llmkit.data.samples import fetch_samples

    paths = fetch_samples(args.out, from_dir=args.from_dir, only=args.only or None, verify=not args.no_verify)
    for p in paths:
        print(p)


def _data_run(args) -> None:
    from llmkit.config import load_config
    from llmkit.data.corpus import CorpusConfig, build_corpus

    cfg = load_config(CorpusConfig, args.config, args.overrides)
    manifest = build_corpus(cfg, restart=args.restart)
    print(json.dumps({"out_dir": cfg.out_dir, "docs_in": manifest["funnel"][0]["in"],
                      "docs_out": manifest["output"]["docs"], "digest": manifest["output"]["digest"],
                      "mb_s_per_core": manifest["throughput"]["pipeline_mb_s_per_core"]}))


def _data_report(args) -> None:
    from llmkit.data.report import load_manifest, manifest_markdown

    manifest = load_manifest(args.run_dir)
    print(json.dumps(manifest, indent=1, ensure_ascii=False) if args.json else manifest_markdown(manifest), end="")


def _tokenizer_train(args) -> None:
    from llmkit.tokenizer import train_tokenizer
    from llmkit.train.objectives import sentinel_token

    extra = list(args.special or []) + [sentinel_token(i) for i in range(args.sentinels)]
    tok = train_tokenizer(args.input, kind=args.kind, vocab_size=args.vocab_size,
                          min_frequency=args.min_frequency, text_field=args.text_field, extra_special_tokens=extra)
    path = tok.save(args.out)
    print(json.dumps({"tokenizer": str(path), "kind": tok.kind, "vocab_size": tok.vocab_size}))


def _prepare(args) -> None:
    from llmkit.data.tokenized import prepare_tokens
    from llmkit.tokenizer import Tokenizer

    meta = prepare_tokens(args.input, Tokenizer.load(args.tokenizer), args.out, val_fraction=args.val_fraction,
                          text_field=args.text_field)
    print(json.dumps({s: {k: v for k, v in info.items() if k != "shards"} for s, info in meta["splits"].items()}))


def _pretrain(args) -> None:
    from llmkit.config import load_config
    from llmkit.train.pretrain import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    summary = pretrain(cfg, resume=args.resume)
    summary.pop("history")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary line, from rank 0
        print(json.dumps(summary))


def _finetune(args) -> None:
    from llmkit.config import load_config_union
    from llmkit.finetune.classify import ClassifyConfig, finetune_classifier
    from llmkit.finetune.preference import PreferenceConfig, finetune_preference
    from llmkit.finetune.sft import SFTConfig, finetune_sft

    # `task:` picks the recipe; without it, the class declaring every key (a `base_model` is SFT's)
    cfg = load_config_union([ClassifyConfig, SFTConfig, PreferenceConfig], args.config, args.overrides, key="task")
    recipe = {SFTConfig: finetune_sft, PreferenceConfig: finetune_preference}.get(type(cfg), finetune_classifier)
    summary = recipe(cfg, resume=args.resume)
    summary.pop("history", None)
    print(json.dumps(summary))


def _meta_lora(args) -> None:
    from llmkit.config import load_config
    from llmkit.finetune.meta_lora import MetaLoRAConfig, meta_train_lora

    print(json.dumps(meta_train_lora(load_config(MetaLoRAConfig, args.config, args.overrides), resume=args.resume),
                     ensure_ascii=False))


def _distill(args) -> None:
    from llmkit.config import load_config
    from llmkit.distill.recipe import DistillConfig, distill

    cfg = load_config(DistillConfig, args.config, args.overrides)
    summary = distill(cfg, resume=args.resume)
    summary.pop("history", None)
    print(json.dumps(summary))


def _distill_exit(args) -> None:
    from llmkit.config import load_config
    from llmkit.distill.exit_adapter import ExitConfig, train_exit_adapter

    summary = train_exit_adapter(load_config(ExitConfig, args.config, args.overrides), resume=args.resume)
    summary.pop("history", None)
    print(json.dumps(summary))


def _model_path(value: str) -> Path:
    """A model dir argument: a path, or a registry URI (models:/NAME@ALIAS, runs:/...) resolved to one."""
    from llmkit.registry import resolve_model

    return resolve_model(value)


def _quantize(args) -> None:
    from llmkit.config import load_config
    from llmkit.infer.quantize import QuantizeDirConfig, quantize_from_config

    cfg = load_config(QuantizeDirConfig, args.config, _overrides(args))
    out = quantize_from_config(cfg)
    print(json.dumps({"quantized": str(out), "mode": cfg.quant.mode}))


def _merge(args) -> None:
    from llmkit.finetune.merge import merge_adapter

    out = merge_adapter(_model_path(args.model), _model_path(args.adapter), args.out)
    print(json.dumps({"merged": str(out)}))


def _model_info(args) -> None:
    from pathlib import Path

    from llmkit.config import load_config
    from llmkit.models.info import model_info
    from llmkit.train.pretrain import PretrainConfig

    source = args.model or args.config
    if source is None:
        raise ValueError("model info: give --config FILE (a training recipe) or --model (a recipe or a model dir)")
    precision = "fp32"
    if Path(source).is_dir():  # a model directory: its config.json
        from llmkit.models.io import load_model_config

        if args.overrides:
            raise ValueError(f"{source} is a model directory: key=value overrides apply to a training recipe")
        model_cfg, batch_size = load_model_config(source)[0], 1
    else:
        cfg = load_config(PretrainConfig, source, args.overrides)
        if cfg.model.vocab_size is None and cfg.data.tokenizer and Path(cfg.data.tokenizer).exists():
            from llmkit.tokenizer import Tokenizer

            cfg.model.vocab_size = Tokenizer.load(cfg.data.tokenizer).vocab_size
        model_cfg, batch_size, precision = cfg.model, cfg.train.batch_size, cfg.train.precision
    if args.plan:
        from llmkit.train.plan import format_plan, parse_bytes, plan_layouts

        if args.gpus is None or args.gpu_mem is None:
            raise ValueError("model info --plan: needs --gpus N and --gpu-mem SIZE (e.g. 80GB)")
        plan = plan_layouts(model_cfg, args.gpus, parse_bytes(args.gpu_mem), seq_len=args.seq_len,
                            micro_batch=args.micro_batch or 1,
                            precision=args.precision or ("bf16" if precision in ("auto", "fp32") else precision),
                            activation_checkpointing=args.activation_checkpointing, microbatches=args.microbatches,
                            schedule=args.schedule, gpus_per_node=args.gpus_per_node)
        print(json.dumps(plan, indent=1) if args.json else format_plan(plan))
        return
    info = model_info(model_cfg, batch_size=args.batch_size or batch_size, seq_len=args.seq_len,
                      activation_bytes=2 if precision in ("bf16", "fp16") else 4)
    print(json.dumps(info, indent=2))


def _import_hf(args) -> None:
    from llmkit.models.hf import import_hf

    model = import_hf(args.from_dir, args.out)
    print(json.dumps({"model": args.out, "n_params": model.num_params(non_embedding=False)}))


def _export_hf(args) -> None:
    from llmkit.models.hf import export_hf

    print(json.dumps({"hf_model": str(export_hf(_model_path(args.model), args.out))}))


def _import_gguf(args) -> None:
    if args.keep_quantized:
        from llmkit.infer.gguf_quantized import load_gguf_quantized
        from llmkit.infer.weight_only import WeightOnlyLinear

        model = load_gguf_quantized(args.from_file, args.out)
        kept = sum(isinstance(m, WeightOnlyLinear) for m in model.modules())
        print(json.dumps({"model": args.out, "quantized_linears": kept}))
        return
    from llmkit.models.gguf import import_gguf

    model = import_gguf(args.from_file, args.out)
    print(json.dumps({"model": args.out, "n_params": model.num_params(non_embedding=False)}))


def _export_gguf(args) -> None:
    from llmkit.models.gguf import export_gguf

    print(json.dumps({"gguf": str(export_gguf(_model_path(args.model), args.out, args.type))}))


def _generate(args) -> None:
    from llmkit.config import load_config
    from llmkit.infer.reply import GenerateConfig, print_generate

    print_generate(load_config(GenerateConfig, args.config, _overrides(args)))


def _pipeline_run(args) -> None:
    from llmkit.config import load_config
    from llmkit.pipeline.config import PipelineConfig
    from llmkit.pipeline.run import run_pipeline

    cfg = load_config(PipelineConfig, args.config, args.overrides)
    state = run_pipeline(cfg, restart=args.restart)
    print(_stage_table(state))
    if state.get("stopped"):
        print(f"stopped during {state['stopped']} (signal): run the same command again to resume", file=sys.stderr)
        sys.exit(3)


def _stage_table(state: dict) -> str:
    rows = [f"{'stage':<10} {'status':<8} {'last run':<8} {'seconds':>8}  digest"]
    for name, rec in state.get("stages", {}).items():
        last = "skipped" if rec.get("skipped_last") else "ran"
        rows.append(f"{name:<10} {rec.get('status', '?'):<8} {last:<8} {rec.get('seconds', 0):>8.1f}  "
                    f"{(rec.get('digest') or '')[:16]}")
    return "\n".join(rows)


def _pipeline_status(args) -> None:
    from llmkit.pipeline.run import load_state

    state = load_state(args.run_dir)
    if not state:
        raise FileNotFoundError(f"{args.run_dir}: no pipeline.json (not a `llmkit pipeline run` directory)")
    print(json.dumps(state, indent=1, ensure_ascii=False) if args.json else _stage_table(state))


def _eval(args) -> None:
    from llmkit.eval.harness import EvalConfig, run_eval

    results = run_eval(EvalConfig(model=args.model, tasks=args.tasks, shots=args.shots, limit=args.limit,
                                  batch_size=args.batch_size, chat_template=args.chat_template,
                                  max_new_tokens=args.max_new_tokens, out=args.out, cache_dir=args.cache_dir,
                                  device=args.device, track=args.track,
                                  tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")))
    summary = {name: {"n": t["n"], **{k: (v["value"] if isinstance(v, dict) else v) for k, v in t["metrics"].items()},
                      "malformed": t["malformed_count"], "cached": t["cached"]}
               for name, t in results["tasks"].items()}
    print(json.dumps(summary, ensure_ascii=False))


def _report(args) -> None:
    from llmkit.pipeline.report import open_in_browser, render_report
    from llmkit.pipeline.run import STATE_FILE

    if not (Path(args.run_dir) / STATE_FILE).is_file():
        raise FileNotFoundError(f"{args.run_dir}: no {STATE_FILE} (not a `llmkit pipeline run` directory)")
    path = render_report(args.run_dir, args.out, log_to_mlflow=not args.no_mlflow)
    print(path)
    if args.open:
        open_in_browser(path)


def _registry_alias(args) -> None:
    from llmkit.registry import set_alias

    set_alias(args.name, args.alias, args.version)
    print(json.dumps({"model": f"models:/{args.name}@{args.alias}", "version": str(args.version)}))


def _registry_resolve(args) -> None:
    from llmkit.registry import resolve_model

    print(resolve_model(args.uri))


def _deploy(args) -> None:
    from llmkit.config import load_config
    from llmkit.serve.deploy import DeployConfig, run_deploy

    serve_args = [f"serve_args={json.dumps(args.passthrough)}"] if args.passthrough else []
    code = run_deploy(load_config(DeployConfig, args.config, _overrides(args, serve_args)))
    if code:
        sys.exit(code)


def _bench_generate(args) -> None:
    from llmkit.infer.bench import bench_generate
    from llmkit.infer.load import load_for_inference

    model, _, _ = load_for_inference(args.model, args.adapter, args.device, args.dtype)
    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    result = bench_generate(model, batches, args.prompt_len, args.new_tokens,
                            reference=None if args.reference == "none" else args.reference, seed=args.seed)
    result["model"] = str(args.model)
    print(json.dumps(result, indent=2))


def _serve(args) -> None:
    from llmkit.config import load_config
    from llmkit.serve import ServeConfig, serve

    serve(load_config(ServeConfig, args.config, _overrides(args)))


# -- config-driven commands: `--config FILE`, flags as shorthands, then `key=value` overrides --------------
_SET = "set:"
"""argparse dest prefix of a flag that is a shorthand for a config key: `--port 9000` is `port=9000`."""


def _shorthand(p: argparse.ArgumentParser, *flags: str, key: str, **kw) -> None:
    """A flag setting config `key`; unset flags leave the file's value (or the dataclass default) alone."""
    if "action" not in kw:
        kw.setdefault("metavar", key.rsplit(".", 1)[-1].upper())
    p.add_argument(*flags, dest=_SET + key, default=argparse.SUPPRESS, **kw)


class _ServeAdapter(argparse.Action):
    """`llmkit serve --adapter`: NAME=DIR adds to config key `adapters` (a mapping, repeatable); a bare DIR sets
    `adapter` (one adapter applied to the model)."""

    def __call__(self, parser, namespace, value, option_string=None):
        import re

        name, sep, path = value.partition("=")
        if sep and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) and path:
            adapters = dict(getattr(namespace, _SET + "adapters", {}))
            adapters[name] = path
            setattr(namespace, _SET + "adapters", adapters)
        else:
            setattr(namespace, _SET + "adapter", value)


def _config_arguments(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help=f"YAML file of {what} settings (keys as in key=value); flags and overrides apply on top")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. port=9000; where a flag and an override set the same key, the "
                   "override wins")


def _overrides(args, extra: list[str] = ()) -> list[str]:
    """The flags given, as `key=value` overrides (JSON values: YAML reads them back exactly), then `extra`,
    then the explicit overrides, so that an explicit `key=value` wins over a flag for the same key."""
    flags = [f"{k[len(_SET):]}={json.dumps(v, ensure_ascii=False)}" for k, v in vars(args).items()
             if k.startswith(_SET)]
    return [*flags, *extra, *args.overrides]


def _device_arguments(p: argparse.ArgumentParser, shorthand: bool = False) -> None:
    """--device / --dtype: plain flags, or (`shorthand`) shorthands for the config keys device / dtype."""
    add = (lambda *f, **kw: _shorthand(p, *f, key=f[0][2:], **kw)) if shorthand else (
        lambda *f, **kw: p.add_argument(*f, default="auto", **kw))
    add("--device", help="cpu, cuda[:i] or auto (a GPU when one is visible; the default)")
    add("--dtype", choices=["auto", "fp32", "bf16", "fp16"],
        help="auto (the default): bf16/fp16 on a GPU, fp32 on the CPU (INT8 dirs keep their int8 weights)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmkit", description="From raw text to a trained language model.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--tracking-uri", default=None, help="MLflow store for models:/ and runs:/ model URIs "
                   "(default $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("samples", help="public sample corpora").add_subparsers(dest="action", required=True)
    f = s.add_parser("fetch", help="download the sample corpora (or copy them from a local mirror)")
    f.add_argument("--out", default="data/samples")
    f.add_argument("--from", dest="from_dir", default=None, help="local mirror to copy from instead of downloading")
    f.add_argument("--only", action="append", help="relative path of one sample (repeatable)")
    f.add_argument("--no-verify", action="store_true", help="skip the sha256 check")
    f.set_defaults(func=_samples)

    d = sub.add_parser("data", help="the data pipeline: clean, dedup, filter, mix, augment").add_subparsers(
        dest="action", required=True)
    dr = d.add_parser("run", help="run (or resume) a data pipeline from a YAML recipe")
    dr.add_argument("--config", required=True)
    dr.add_argument("--restart", action="store_true", help="discard earlier work in out_dir first")
    dr.add_argument("overrides", nargs="*", help="key.sub=value")
    dr.set_defaults(func=_data_run)
    drep = d.add_parser("report", help="the funnel of a finished run: what each step kept and dropped")
    drep.add_argument("run_dir")
    drep.add_argument("--json", action="store_true", help="print the whole manifest")
    drep.set_defaults(func=_data_report)

    t = sub.add_parser("tokenizer", help="tokenizers").add_subparsers(dest="action", required=True)
    tt = t.add_parser("train", help="train a byte-level BPE or char-level tokenizer")
    tt.add_argument("--input", action="append", required=True, help="text / jsonl / json file (repeatable)")
    tt.add_argument("--kind", choices=["bpe", "char"], default="bpe")
    tt.add_argument("--vocab-size", type=int, default=8192)
    tt.add_argument("--min-frequency", type=int, default=2)
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--special", action="append", help="an extra special token, e.g. '<|mask|>' (repeatable)")
    tt.add_argument("--sentinels", type=int, default=0, help="add <|sentinel_0|> .. for span corruption (T5)")
    tt.add_argument("--out", required=True)
    tt.set_defaults(func=_tokenizer_train)

    pr = sub.add_parser("prepare", help="tokenize files into memmap shards for pretraining")
    pr.add_argument("--input", action="append", required=True)
    pr.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    pr.add_argument("--out", required=True)
    pr.add_argument("--val-fraction", type=float, default=0.1)
    pr.add_argument("--text-field", default="text")
    pr.set_defaults(func=_prepare)

    pt = sub.add_parser("pretrain", help="pretrain a decoder-only model from a YAML recipe")
    pt.add_argument("--config", required=True)
    pt.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    pt.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")
    pt.set_defaults(func=_pretrain)

    ft = sub.add_parser("finetune", help="fine-tune: instructions on a decoder (full / lora / prefix; task: sft) "
                        "or a classification head on an encoder (task: classify), or preference tuning "
                        "(DPO / IPO / ORPO / SimPO / KTO; task: preference)")
    ft.add_argument("--config", required=True)
    ft.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    ft.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ft.set_defaults(func=_finetune)

    ml = sub.add_parser("meta-lora", help="meta-learn a LoRA initialisation over many small instruction tasks "
                        "(Reptile / first-order MAML); lora.init_from in `llmkit finetune` starts from it")
    ml.add_argument("--config", required=True)
    ml.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    ml.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ml.set_defaults(func=_meta_lora)

    ds = sub.add_parser("distill", help="knowledge distillation: a smaller student trained on a teacher's "
                        "distributions (forward / reverse KL, JSD), the teacher's outputs cached by content")
    ds.add_argument("--config", required=True)
    ds.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    ds.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ds.set_defaults(func=_distill)

    de = sub.add_parser("distill-exit", help="train an early-exit adapter for self-speculative decoding (the "
                        "model stays frozen; its first K layers + the adapter draft, all layers verify)")
    de.add_argument("--config", required=True)
    de.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    de.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    de.set_defaults(func=_distill_exit)

    qz = sub.add_parser("quantize", help="INT8 weights (dynamic, weight-only or calibrated static activations) or "
                                         "group-wise INT4 weights")
    _config_arguments(qz, "quantization (llmkit.infer.quantize.QuantizeDirConfig)")
    _shorthand(qz, "--model", key="model", help="a plain llmkit model directory (or models:/NAME@ALIAS)")
    _shorthand(qz, "--out", key="out", help="the quantized model directory to write")
    _shorthand(qz, "--mode", key="quant.mode", choices=["dynamic", "weight_only", "static", "int4"],
               help="default dynamic")
    _shorthand(qz, "--group-size", key="quant.group_size", type=int,
               help="int4: input columns per scale, a multiple of 32 (default 32)")
    _shorthand(qz, "--observer", key="quant.observer", choices=["minmax", "percentile", "histogram"],
               help="how static mode picks activation ranges from the calibration data (default histogram)")
    _shorthand(qz, "--calibration", key="calibration", help="text for static calibration (txt / jsonl / json)")
    _shorthand(qz, "--calibration-batches", "--calibration-windows", key="calibration_windows", type=int,
               help="windows of block_size tokens read for calibration (default 16)")
    _shorthand(qz, "--with-head", key="with_head", action="store_true",
               help="quantize the output head too (fastest decode)")
    qz.set_defaults(func=_quantize)

    mg = sub.add_parser("merge", help="fold a LoRA adapter into its base model: a plain model directory")
    mg.add_argument("--model", required=True, help="the base model directory")
    mg.add_argument("--adapter", required=True, help="the adapter directory (PEFT layout)")
    mg.add_argument("--out", required=True)
    mg.set_defaults(func=_merge)

    m = sub.add_parser("model", help="inspect model configurations").add_subparsers(dest="action", required=True)
    mi = m.add_parser("info", help="parameters by part, FLOPs per token, training memory")
    mi.add_argument("--config", default=None, help="a pretraining recipe (its model section is used)")
    mi.add_argument("--model", default=None, help="a pretraining recipe, or a model directory (config.json)")
    mi.add_argument("--batch-size", type=int, default=None, help="default: the recipe's train.batch_size")
    mi.add_argument("--seq-len", type=int, default=None, help="default: model.block_size")
    mi.add_argument("--plan", action="store_true", help="rank the parallel layouts (dp, fsdp, tp, pp) that fit "
                    "--gpus GPUs of --gpu-mem each, by predicted peak memory per rank (llmkit.train.plan)")
    mi.add_argument("--gpus", type=int, default=None, help="--plan: number of GPUs")
    mi.add_argument("--gpu-mem", default=None, metavar="SIZE", help="--plan: memory of one GPU, e.g. 80GB, 80GiB")
    mi.add_argument("--micro-batch", type=int, default=None, help="--plan: sequences per micro-batch (default 1)")
    mi.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                    help="--plan: default the recipe's train.precision, bf16 where that is auto")
    mi.add_argument("--activation-checkpointing", action="store_true", help="--plan: recompute blocks in backward")
    mi.add_argument("--microbatches", type=int, default=None, help="--plan: micro-batches per step under pp "
                    "(default pp)")
    mi.add_argument("--schedule", choices=["1f1b", "gpipe"], default="1f1b", help="--plan: pipeline schedule")
    mi.add_argument("--gpus-per-node", type=int, default=8, help="--plan: tp beyond this ranks last (default 8)")
    mi.add_argument("--json", action="store_true", help="--plan: the whole plan as JSON")
    mi.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. model.vocab_size=32000")
    mi.set_defaults(func=_model_info)

    im = sub.add_parser("import", help="bring checkpoints from other tools").add_subparsers(dest="action", required=True)
    ih = im.add_parser("hf", help="a local Hugging Face model directory (GPT-2, Llama, Mistral, Qwen2/3, Phi-3, "
                       "Gemma 1/2, BERT, T5)")
    ih.add_argument("--from", dest="from_dir", required=True)
    ih.add_argument("--out", required=True)
    ih.set_defaults(func=_import_hf)
    ig = im.add_parser("gguf", help="a GGUF file (llama.cpp / Ollama): llama, qwen2, qwen3; dequantized to fp32")
    ig.add_argument("--from", dest="from_file", required=True)
    ig.add_argument("--out", required=True)
    ig.add_argument("--keep-quantized", action="store_true",
                    help="keep Q4_0 / Q8_0 weights as they are (INT4 / INT8 layers): a quantized model directory")
    ig.set_defaults(func=_import_gguf)
    ex = sub.add_parser("export", help="write models for other tools").add_subparsers(dest="action", required=True)
    eh = ex.add_parser("hf", help="a Hugging Face directory loadable with from_pretrained")
    eh.add_argument("--model", required=True)
    eh.add_argument("--out", required=True)
    eh.set_defaults(func=_export_hf)
    eg = ex.add_parser("gguf", help="a GGUF file llama.cpp and Ollama load")
    eg.add_argument("--model", required=True)
    eg.add_argument("--out", required=True)
    eg.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"])
    eg.set_defaults(func=_export_gguf)

    pl = sub.add_parser("pipeline", help="the whole lifecycle: data -> tokenizer -> pretrain -> SFT -> int8 -> "
                        "eval -> registered model").add_subparsers(dest="action", required=True)
    plr = pl.add_parser("run", help="run (or resume) a pipeline recipe; unchanged stages are skipped")
    plr.add_argument("--config", default=None, metavar="FILE", help="the pipeline recipe (YAML)")
    plr.add_argument("overrides", nargs="*", metavar="key=value", help="key.sub=value overrides, e.g. "
                     "pretrain.overrides=[train.max_steps=50]; a first argument without '=' is the recipe "
                     "(the older `pipeline run FILE` form)")
    plr.add_argument("--restart", action="store_true", help="forget earlier work in out_dir first")
    plr.set_defaults(func=_pipeline_run)
    pls = pl.add_parser("status", help="the stages of a pipeline run dir: status, seconds, digests")
    pls.add_argument("run_dir")
    pls.add_argument("--json", action="store_true")
    pls.set_defaults(func=_pipeline_status)
    rp = sub.add_parser("report", help="the monitoring report of a pipeline run (self-contained HTML with plots)")
    rp.add_argument("run_dir")
    rp.add_argument("--out", default=None, help="directory for index.html and the PNGs (default RUN_DIR/report)")
    rp.add_argument("--open", action="store_true", help="open it in the default browser")
    rp.add_argument("--no-mlflow", action="store_true", help="do not log the report to the pipeline's MLflow run")
    rp.set_defaults(func=_report)
    ev = sub.add_parser("eval", help="benchmarks: multiple choice by log-likelihood (MMLU / C-Eval / CMMLU / ARC / "
                        "HellaSwag layouts), GSM8K generation, perplexity; cached per example (docs/eval.md)")
    ev.add_argument("--model", required=True, help="a model directory (or models:/NAME@ALIAS)")
    ev.add_argument("--tasks", required=True, help="comma-separated: sample_mmlu, sample_ceval, sample_arc, "
                    "sample_gsm8k, sample_ppl_en, or LAYOUT:PATH (mmlu, ceval, cmmlu, arc, hellaswag, gsm8k, ppl)")
    ev.add_argument("--shots", type=int, default=0, help="few-shot examples from the dev/train split (default 0)")
    ev.add_argument("--limit", type=int, default=None, help="the first N examples of each task")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--chat-template", action="store_true", help="each prompt as a user turn of the model's template")
    ev.add_argument("--max-new-tokens", type=int, default=256, help="generative tasks (default 256)")
    ev.add_argument("--out", default=None, help="results JSON file")
    ev.add_argument("--cache-dir", default="runs/eval_cache", help="per-example results (resume, instant rerun)")
    ev.add_argument("--device", default="auto", help="auto (a GPU when visible), cpu or cuda[:i]")
    ev.add_argument("--track", action="store_true", help="log params and metrics to MLflow (--tracking-uri)")
    ev.set_defaults(func=_eval)
    rg = sub.add_parser("registry", help="the MLflow model registry").add_subparsers(dest="action", required=True)
    rga = rg.add_parser("alias", help="point an alias (e.g. production) at a registered version")
    rga.add_argument("name")
    rga.add_argument("alias")
    rga.add_argument("version", type=int)
    rga.set_defaults(func=_registry_alias)
    rgr = rg.add_parser("resolve", help="the local directory of models:/NAME@ALIAS, models:/NAME/VERSION, runs:/...")
    rgr.add_argument("uri")
    rgr.set_defaults(func=_registry_resolve)

    from llmkit.lab.run import add_lab_arguments

    add_lab_arguments(sub)

    dp = sub.add_parser("deploy", help="N llmkit serve replicas behind nginx on this machine (or print the nginx / "
                        "Kubernetes configs); after `--`: flags for every replica's `llmkit serve`")
    _config_arguments(dp, "deployment (llmkit.serve.deploy.DeployConfig)")
    _shorthand(dp, "--model", key="model", help="model directory served by every replica")
    _shorthand(dp, "--replicas", key="replicas", type=int, help="number of `llmkit serve` processes (default 2)")
    _shorthand(dp, "--host", key="host", help="address nginx listens on (0.0.0.0: all interfaces)")
    _shorthand(dp, "--port", key="port", type=int, help="nginx's port (default 8000)")
    _shorthand(dp, "--base-port", key="base_port", type=int,
               help="port of the first replica, the others follow consecutively (default: port + 1)")
    _shorthand(dp, "--run-dir", key="run_dir", help="nginx.conf, pid file, logs of nginx and replicas")
    _shorthand(dp, "--nginx", key="nginx", help="nginx binary (default: nginx on PATH or /usr/sbin/nginx)")
    _shorthand(dp, "--max-body", key="max_body", help="nginx client_max_body_size (default 8m)")
    _shorthand(dp, "--max-fails", key="max_fails", type=int, help="failures that take a replica out (default 3)")
    _shorthand(dp, "--fail-timeout", key="fail_timeout", type=int,
               help="seconds in which max-fails count, and for which a failed replica is left out (default 10)")
    _shorthand(dp, "--health-timeout", key="health_timeout", type=float,
               help="seconds to wait for each replica's /health (default 300)")
    _shorthand(dp, "--print-config", key="print_config", choices=["nginx", "kubernetes"],
               help="print the nginx configuration (or the Kubernetes manifests) and exit; starts nothing")
    dp.set_defaults(func=_deploy, takes_passthrough=True)

    bn = sub.add_parser("bench", help="measure speed").add_subparsers(dest="action", required=True)
    bg = bn.add_parser("generate", help="decoding tokens/s, time to first token and per token, per batch size "
                       "(JSON), optionally beside Hugging Face generate on the same weights")
    bg.add_argument("--model", required=True)
    bg.add_argument("--adapter", default=None)
    bg.add_argument("--batch", default="1,8,32", help="comma-separated batch sizes")
    bg.add_argument("--prompt-len", type=int, default=128)
    bg.add_argument("--new-tokens", type=int, default=128)
    bg.add_argument("--reference", choices=["none", "hf"], default="none")
    bg.add_argument("--seed", type=int, default=0)
    _device_arguments(bg)
    bg.set_defaults(func=_bench_generate)

    g = sub.add_parser("generate", help="sample text from a model directory")
    _config_arguments(g, "generation (llmkit.infer.reply.GenerateConfig)")
    _shorthand(g, "--model", key="model", help="a model directory (or models:/NAME@ALIAS)")
    _shorthand(g, "--adapter", key="adapter", help="a LoRA or prefix adapter directory to apply")
    _shorthand(g, "--prompt", key="prompt")
    _shorthand(g, "--parallel", key="parallel", choices=["tp", "pp"],
               help="under torchrun: tensor- (tp) or pipeline- (pp) parallel decoding across the ranks")
    _shorthand(g, "--raw", key="raw", action="store_true", help="continue the prompt as text even when the "
               "model has a chat template (by default an instruction-tuned model gets the prompt as a user turn)")
    _shorthand(g, "--max-new-tokens", key="max_new_tokens", type=int, help="default 256")
    _shorthand(g, "--temperature", key="temperature", type=float, help="default 0.7; 0: greedy")
    _shorthand(g, "--top-k", key="top_k", type=int)
    _shorthand(g, "--top-p", key="top_p", type=float, help="default 0.9")
    _shorthand(g, "--seed", key="seed", type=int)
    _shorthand(g, "--speculative", key="speculative", choices=["ngram", "draft"],
               help="speculative decoding: prompt lookup (ngram) or a draft model (draft); same output distribution")
    _shorthand(g, "--draft-model", key="draft_model",
               help="--speculative draft: a model dir with the same tokenizer, int8 (default), layers:K or "
               "exit:DIR (first K layers + the exit adapter `llmkit distill-exit` trained)")
    _shorthand(g, "--num-draft", key="num_draft", type=int, help="draft tokens per target forward (default 4)")
    _shorthand(g, "--draft-confidence", key="draft_confidence", type=float,
               help="stop drafting at a token the draft gives less than this probability (default 0: never)")
    _device_arguments(g, shorthand=True)
    g.set_defaults(func=_generate)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _config_arguments(sv, "server (llmkit.serve.ServeConfig)")
    _shorthand(sv, "--model", key="model", help="a model directory (plain or quantized)")
    sv.add_argument("--adapter", action=_ServeAdapter, dest=_SET + "adapter", default=argparse.SUPPRESS,
                    metavar="[NAME=]DIR", help="NAME=DIR (repeatable): a LoRA adapter served beside the base as "
                    "model '<served name>:NAME', all in one batch; DIR alone: one LoRA or prefix adapter applied "
                    "to the model (then the only one)")
    _shorthand(sv, "--adapter-budget-mb", key="adapter_budget_mb", type=float,
               help="memory the loaded adapters' weights may take, MiB; idle ones are paged out (default 1024)")
    _shorthand(sv, "--served-model-name", key="served_model_name",
               help="the model id clients use (default: the dir name)")
    _shorthand(sv, "--host", key="host", help="bind address (default 127.0.0.1: loopback only)")
    _shorthand(sv, "--port", key="port", type=int, help="default 8000")
    _shorthand(sv, "--api-key", key="api_key", help="require 'Authorization: Bearer KEY' on /v1/* "
               "(default: $LLMKIT_API_KEY; none: open)")
    _shorthand(sv, "--max-batch", key="max_batch", type=int,
               help="requests decoding together (KV cache slots; default 16)")
    _shorthand(sv, "--max-queue", key="max_queue", type=int,
               help="requests waiting for a slot; more get HTTP 429 (default 64)")
    _shorthand(sv, "--max-model-len", key="max_model_len", type=int,
               help="context length (default: block_size, or less where max_batch of them would not fit "
               "in kv_cache_gb)")
    _shorthand(sv, "--kv-cache-gb", key="kv_cache_gb", type=float,
               help="memory the KV cache may take, GiB (default 2)")
    _shorthand(sv, "--prefix-cache-tokens", key="prefix_cache_tokens", type=int, help="default 4096")
    _shorthand(sv, "--max-request-bytes", key="max_request_bytes", type=int,
               help="larger bodies get HTTP 413 (default 1 MiB)")
    _shorthand(sv, "--shutdown-grace", key="shutdown_grace", type=float,
               help="seconds in-flight requests may finish after SIGTERM before they are cancelled (default 10)")
    _device_arguments(sv, shorthand=True)
    sv.set_defaults(func=_serve)
    return p
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line. Arguments after a first `--` are `passthrough` (deploy: each replica's
    `llmkit serve` flags); `pipeline run FILE` (positional recipe) is read as `--config FILE`."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if "--" in argv:
        argv, passthrough = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    args = parser.parse_args(argv)
    if passthrough and not getattr(args, "takes_passthrough", False):
        parser.error(f"unrecognized arguments after --: {' '.join(passthrough)}")
    args.passthrough = passthrough
    if getattr(args, "func", None) is _pipeline_run and args.overrides and "=" not in args.overrides[0]:
        if args.config is not None:
            parser.error(f"pipeline run: two recipes: --config {args.config} and {args.overrides[0]}")
        args.config, args.overrides = args.overrides[0], args.overrides[1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, FetchError) as e:
        print(f"llmkit: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

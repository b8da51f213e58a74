"""params.yaml as typed pydantic models: one section per stage, a YAML key is a field of the same name."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.common.errors import ConfigError

PARAMS_FILE = Path("params.yaml")


class Section(BaseModel):
    # Unknown keys fail fast: a typo in params.yaml must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsConfig(Section):
    """Where each stage reads and writes, relative to the repository root; dvc.yaml templates these."""

    raw: str = "data/raw"
    validated: str = "data/validated"
    quarantine: str = "data/quarantine"
    dedup: str = "data/dedup"
    duplicates: str = "data/duplicates"
    tokens: str = "data/tokens"
    tokenizer: str = "models/tokenizer"
    reports: str = "reports"
    metrics: str = "metrics"
    instructions: str = "data/instructions"  # finetune's pairs: train/eval JSONL and the quarantine
    pretrain_model: str = "models/pretrain"
    finetune_model: str = "models/finetune"  # full weights (LoRA merged): what evaluation and serving load
    adapter: str = "models/adapter"  # the LoRA adapter itself (empty for full fine-tuning)
    checkpoints: str = "checkpoints"  # resumable training state; not a DVC output, never half-taken as done
    quantized: str = "models/quantized"  # one compressed-tensors HF directory per scheme (w8a8/, w4a16/)
    registry: str = "models/registry"  # registry downloads: <name>/<version>/ (a plain HF directory)


class TrackingConfig(Section):
    uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI in the environment wins (shared servers)
    artifact_root: str = "mlartifacts"
    experiment: str = "llmops"


class PipelineConfig(Section):
    push: bool = True  # `dvc push` to the default remote after a successful run
    stage_retries: int = Field(0, ge=0)  # stage logic is deterministic: retrying a failure repeats it


class ModelConfig(Section):
    base: str = ""  # a local HF model directory; empty = pretrain from scratch with our own tokenizer


class IngestConfig(Section):
    source: str | list[str] = ""  # path, glob, .jsonl, .parquet, HF dataset dir; "" = Python stdlib source
    text_field: str = "text"  # column/key that holds the text in JSONL, Parquet and HF datasets
    id_field: str = "id"  # column/key with a stable id; absent = derived from source path + row
    file_glob: str = "**/*.py"  # files taken when `source` is a directory
    max_file_bytes: int = Field(50_000_000, gt=0)  # larger files are skipped and listed, not read
    shard_max_bytes: int = Field(16_000_000, gt=0)


class ValidateConfig(Section):
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(2_000_000, gt=0)
    max_line_chars: int = Field(10_000, gt=0)
    max_control_char_ratio: float = Field(0.001, ge=0, le=1)  # control chars other than \t \n \r \f
    min_alnum_ratio: float = Field(0.05, ge=0, le=1)
    min_pass_rate: float = Field(0.95, ge=0, le=1)
    shard_max_bytes: int = Field(16_000_000, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> ValidateConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) > max_chars ({self.max_chars})")
        return self


class DedupConfig(Section):
    engine: Literal["rensa", "datasketch"] = "rensa"
    threshold: float = Field(0.7, gt=0, le=1)  # Jaccard similarity above which two docs are near-duplicates
    shingle_words: int = Field(5, ge=1)
    num_perm: int = Field(128, ge=16)
    seed: int = 1
    workers: int = Field(0, ge=0)  # 0 = one per CPU core
    shard_max_bytes: int = Field(16_000_000, gt=0)


class TokenizeConfig(Section):
    vocab_size: int = Field(8192, ge=260)
    min_frequency: int = Field(2, ge=1)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    split_seed: int = 0
    batch_docs: int = Field(256, ge=1)
    length_histogram_bins: int = Field(32, ge=4)


class TrainConfig(Section):
    """How pretrain and finetune run: launcher, precision, checkpoints. Shared by both stages."""

    launcher: Literal["none", "torchrun", "accelerate"] = "none"
    nproc_per_node: int = Field(1, ge=1)  # processes per node under torchrun / accelerate
    nnodes: int = Field(1, ge=1)
    accelerate_config: str = "infra/accelerate/ddp.yaml"  # used when launcher = accelerate
    ddp_backend: Literal["", "gloo", "nccl"] = ""  # "" = nccl on GPU, gloo on CPU
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = bf16 on a GPU that has it, else fp32
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    seed: int = 0
    log_every: int = Field(1, ge=1)  # optimizer steps between MLflow metric points
    save_every: int = Field(50, ge=1)  # optimizer steps between checkpoints
    keep_checkpoints: int = Field(2, ge=1)
    dataloader_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class PretrainConfig(Section):
    preset: str = "tiny"  # a key of `presets`
    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)  # name -> transformers config fields (+ model_type)
    seq_len: int = Field(256, ge=8)
    token_budget: int = Field(400_000, ge=1)  # training tokens; steps = budget / (batch * accum * processes * seq_len)
    batch_size: int = Field(16, ge=1)  # per process
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    eval_tokens: int = Field(50_000, ge=0)  # held-out tokens scored at the end (0 = the whole val split)

    @model_validator(mode="after")
    def _preset_exists(self) -> PretrainConfig:
        if self.presets and self.preset not in self.presets:
            raise ValueError(f"preset {self.preset!r} is not one of the presets: {', '.join(self.presets)}")
        return self


class LoraConfig(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"  # peft's name for every linear layer but the output head


class FinetuneConfig(Section):
    data: str = ""  # JSONL of {prompt, response} or {messages: [...]}; "" = docstring -> body pairs from the corpus
    method: Literal["lora", "full"] = "lora"
    template: Literal["code", "chat"] = "code"  # code: prompt and response concatenated, as HumanEval prompts
    max_seq_len: int = Field(512, ge=16)  # longer pairs are quarantined with the reason
    packing: bool = True  # padding-free packing (position ids restart per pair); false = pad each batch
    eval_fraction: float = Field(0.1, gt=0, lt=1)  # share of source files (corpus pairs) or rows held out
    max_train_pairs: int = Field(0, ge=0)  # 0 = all
    max_eval_pairs: int = Field(100, ge=0)  # 0 = all
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(0, ge=0)  # caps the epochs; 0 = no cap
    batch_size: int = Field(8, ge=1)  # pairs per process per micro-batch
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    lora: LoraConfig = LoraConfig()


class EvaluateConfig(Section):
    """Perplexity, HumanEval (sandboxed execution) and eval-split match of the fine-tuned model."""

    seq_len: int = Field(256, ge=8)  # perplexity block length
    eval_tokens: int = Field(50_000, ge=0)  # held-out tokens scored (0 = the whole val split)
    batch_size: int = Field(16, ge=1)  # perplexity blocks / prompts per generate call
    compare_base: bool = True  # also score the pretrained base (or model.base) for comparison
    max_problems: int = Field(20, ge=0, le=164)  # HumanEval problems, in order (164 = all; 0 = skip HumanEval)
    samples_per_problem: int = Field(1, ge=1)  # n; greedy decoding when 1, sampling otherwise
    pass_k: list[int] = Field(default_factory=lambda: [1, 10])  # pass@k reported for every k <= n
    temperature: float = Field(0.8, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(128, ge=1)
    max_pairs: int = Field(50, ge=0)  # fine-tune eval split pairs generated (0 = all)
    seed: int = 0
    timeout_s: float = Field(5.0, gt=0)  # wall clock per program
    memory_mb: int = Field(1024, ge=64)  # address space per program
    max_processes: int = Field(32, ge=1)  # processes per program (stops fork bombs)
    max_file_mb: int = Field(16, ge=1)  # largest file a program may write
    workers: int = Field(0, ge=0)  # programs run at once; 0 = one per CPU core
    allow_unsandboxed: bool = False  # run generated code with rlimits only where namespaces are unavailable (unsafe)

    @model_validator(mode="after")
    def _positive_k(self) -> EvaluateConfig:
        if any(k < 1 for k in self.pass_k):
            raise ValueError(f"pass_k values must be >= 1 (got {self.pass_k})")
        return self


QuantizeScheme = Literal["w8a8", "w4a16", "fp8_dynamic"]


class QuantizeConfig(Section):
    """llm-compressor schemes applied to the fine-tuned model, and how their quality, size, memory and speed are measured."""

    schemes: list[QuantizeScheme] = Field(default_factory=lambda: ["w8a8", "w4a16", "fp8_dynamic"])  # fp8_dynamic: GPU only
    calibration_samples: int = Field(64, ge=1)  # blocks of the train split fed to SmoothQuant / GPTQ
    calibration_seq_len: int = Field(256, ge=8)  # tokens per calibration block
    seed: int = 0  # which train blocks are drawn
    smoothing_strength: float = Field(0.8, gt=0, lt=1)  # SmoothQuant alpha (W8A8): activation outliers moved into weights
    w4a16_group_size: int = Field(0, ge=0)  # weights per scale; 0 = the largest of 128/64/32 (vLLM's int4 kernels) dividing every layer's in-features
    max_perplexity_increase: float = Field(0.10, ge=0)  # relative held-out perplexity increase a variant may show (0.10 = 10%)
    humaneval: bool = True  # also score HumanEval pass@1 of every variant (evaluate.max_problems problems)
    latency_prompt_tokens: int = Field(32, ge=1)  # CPU generation latency: prompt length (from the held-out split)
    latency_new_tokens: int = Field(32, ge=1)  # tokens generated per timed run (EOS ignored, so every run is equal)
    latency_repeats: int = Field(5, ge=1)  # timed runs per model (median reported), after one warm-up

    @model_validator(mode="after")
    def _distinct(self) -> QuantizeConfig:
        if len(set(self.schemes)) != len(self.schemes):
            raise ValueError(f"schemes must not repeat (got {self.schemes})")
        return self
class GateConfig(Section):
    """When a challenger replaces the champion; both are scored on the same eval data (llmops.eval_data)."""

    min_pass_at_1_delta: float = Field(0.0, ge=-1, le=1)  # challenger pass@1 >= champion pass@1 + this
    max_perplexity_increase: float = Field(0.05, ge=0)  # challenger perplexity <= champion perplexity * (1 + this)
    reevaluate_champion: bool = True  # champion scored on other eval data: re-score it on the current data before comparing


class RegisterConfig(Section):
    """The MLflow registered model the register stage adds a version to, and the champion/challenger gate."""

    model_name: str = Field("llmops-code", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    register_quantized: bool = True  # also register each paths.quantized/<scheme>/ as a version of <model_name>-<scheme>
    log_transformers_flavor: bool = True  # log the MLflow transformers flavor (mlflow.transformers.load_model works)
    emit_events: bool = True  # Prefect event llmops.champion.changed when the champion changes (best effort)
    gate: GateConfig = GateConfig()


# `register` is also ABCMeta.register on the class (not on instances, where the field wins): the warning is noise.
warnings.filterwarnings("ignore", message='Field name "register" in "Params" shadows', category=UserWarning)


class ServeConfig(Section):
    """`llmops serve` / the deploy flow: one key-checking proxy in front of vLLM (GPU) or `transformers serve` (CPU)."""

    host: str = "127.0.0.1"  # interface of the public, key-checking port; 0.0.0.0 serves other machines
    port: int = Field(8000, ge=0, le=65535)  # 0 = a free port
    backend: Literal["auto", "vllm", "transformers"] = "auto"  # auto = vllm where it is installed and a GPU is present
    device: str = "cpu"  # transformers backend: cpu | cuda | auto
    cb_num_blocks: int = Field(128, ge=0)  # transformers backend: KV-cache blocks (256 tokens each); 0 = sized from free memory (slow on CPU)
    cb_max_batch_tokens: int = Field(1024, ge=0)  # transformers backend: tokens per continuous batch; 0 = library default
    api_key_file: str = ".secrets/llmops_api_key"  # read when $LLMOPS_API_KEY is unset; created (mode 0600, random key) if missing
    health_timeout_s: float = Field(300.0, gt=0)  # /health must answer 200 within this after launch
    max_model_len: int = Field(2048, ge=16)  # vllm --max-model-len
    tensor_parallel_size: int = Field(1, ge=1)  # vllm --tensor-parallel-size (GPUs per replica)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # vllm: share of GPU memory for weights + KV cache
    max_lora_rank: int = Field(16, ge=1)  # vllm --max-lora-rank when the model is a LoRA adapter
    request_timeout_s: float = Field(120.0, gt=0)  # per request, smoke and load tests
    smoke_max_tokens: int = Field(16, ge=1)
    load_clients: int = Field(8, ge=1)  # concurrent clients of the load test
    load_requests: int = Field(32, ge=1)  # requests in all, shared by the clients
    load_max_tokens: int = Field(32, ge=1)
    max_error_rate: float = Field(0.0, ge=0, le=1)  # load-test gate: failed requests / requests
    max_p95_latency_s: float = Field(60.0, ge=0)  # load-test gate; 0 = no limit
    after_run: bool = True  # `llmops run` ends with the deploy flow (when the run covers the whole DAG)
class MonitorConfig(Section):
    """The drift monitor: where a batch is staged, the threshold of each check, where results are tracked."""

    experiment: str = "llmops-monitor"  # MLflow experiment: one run per batch
    workdir: str = "data/monitor"  # side area for batches (raw/validated/tokens per batch id); never a training path
    batches_dir: str = "data/batches"  # a flagged batch is copied here and added to ingest.source for the retrain
    heldout_batch: str = "data/monitor/heldout.jsonl"  # tokenize's validation-split documents, exported for `llmops monitor --heldout`
    model: str = ""  # model whose perplexity is checked; "" = <model_name>@production, else @champion, else paths.finetune_model
    length_ks_max: float = Field(0.3, gt=0, le=1)  # KS statistic between token-length distributions (binned CDFs)
    length_ks_alpha: float = Field(0.01, gt=0, lt=1)  # a small batch is flagged only above the KS value chance exceeds this rarely
    unigram_js_max: float = Field(0.12, gt=0, le=1)  # Jensen-Shannon divergence (base 2) of unigram distributions
    oov_rate_increase_max: float = Field(0.01, ge=0, le=1)  # (unk + byte-fallback rate) of the batch minus the reference
    min_pass_rate: float = Field(0.9, ge=0, le=1)  # validation pass rate of the batch
    near_duplicate_share_max: float = Field(0.5, ge=0, le=1)  # share of batch docs near-duplicating a training doc (replayed data)
    perplexity_ratio_max: float = Field(1.5, gt=0)  # model perplexity on the batch / on the held-out split
    perplexity_tokens: int = Field(50_000, ge=0)  # tokens scored on each side (0 = all)
    retrain: bool = True  # past a threshold: emit llmops.drift.detected and run the pipeline with the batch added
    after_run: bool = True  # `llmops run` ends with the monitor on the held-out batch (record only, never retrains)


class Params(Section):
    paths: PathsConfig = PathsConfig()
    tracking: TrackingConfig = TrackingConfig()
    pipeline: PipelineConfig = PipelineConfig()
    model: ModelConfig = ModelConfig()
    ingest: IngestConfig = IngestConfig()
    # `validate` would shadow a pydantic BaseModel method, so the field is `validate_` with the YAML key as alias.
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    dedup: DedupConfig = DedupConfig()
    tokenize: TokenizeConfig = TokenizeConfig()
    train: TrainConfig = TrainConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    register: RegisterConfig = RegisterConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return sorted(f.alias or name for name, f in model.model_fields.items())


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel]:
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            break
        model = field.annotation
    return model


def parse_params(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Validate a params mapping; every error names the key path, the rule, and the allowed keys."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                allowed = ", ".join(_allowed_keys(_model_at(err["loc"])))
                lines.append(f"{source}: unknown key '{key}'. Allowed keys here: {allowed}")
            else:
                lines.append(f"{source}: '{key}': {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], value parsed as a YAML scalar, so 0.5 is a float and true a bool)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set dedup.threshold=0.8")
    key, value = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    return parts, yaml.safe_load(value) if value.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with each KEY.PATH=VALUE applied (validation happens in parse_params)."""
    import copy

    out = copy.deepcopy(raw or {})
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is a value, not a section")
        node[parts[-1]] = value
    return out


def load_params(path: Path = PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found. Run from the repository root, or pass --params PATH.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return parse_params(apply_overrides(raw, overrides or []), source=str(path))


def write_overrides(path: Path, overrides: list[str]) -> None:
    """Write --set overrides into params.yaml, keeping its comments, so DVC sees the new params.

    This is what `dvc exp run --set-param` does too: DVC tracks params by file content.
    """
    from ruamel.yaml import YAML

    from tasks.common.io import atomic_write_bytes

    load_params(path, overrides)  # validate first: never write a params.yaml that does not load
    ryaml = YAML()
    ryaml.preserve_quotes = True
    doc = ryaml.load(Path(path).read_text())
    for item in overrides:
        parts, value = parse_override(item)
        node = doc
        for part in parts[:-1]:
            if part not in node:
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    import io

    buf = io.StringIO()
    ryaml.dump(doc, buf)
    atomic_write_bytes(Path(path), buf.getvalue().encode())

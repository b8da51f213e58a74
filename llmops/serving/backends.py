"""What gets served and how: check a model directory (safetensors only, no remote code), pick the backend, build its command line."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from llmops.common import env
from llmops.params.serve import ServeConfig
from llmops.common.errors import ConfigError, ServeError

if TYPE_CHECKING:
    from llmops.params.paths import PathsConfig

PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


@dataclass(frozen=True)
class ServedModel:
    """A checked local model directory and the name clients ask for."""

    path: Path
    name: str  # the model name in requests (`--served-model-name`)
    adapter_base: Path | None = None  # set when `path` is a LoRA adapter: the base model it applies to
    quantization: str = ""  # the checkpoint's quantization_config.quant_method (e.g. compressed-tensors)
    lora_rank: int = 0
    draft: Path | None = None  # speculative decoding: the draft model (serve.speculative, set by speculative.with_draft)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ServeError(f"{path}: cannot read it as JSON ({exc})") from None


def _check_weights(path: Path, weights_glob: str) -> None:
    """Refuse directories whose weights are not safetensors: a pickle checkpoint runs code when loaded."""
    if not any(path.glob(weights_glob)):
        pickles = sorted(p.name for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
        found = f" (found pickle weights: {', '.join(pickles)})" if pickles else ""
        raise ServeError(f"{path}: no safetensors weights{found}. Models are served from safetensors only; re-save with save_pretrained(safe_serialization=True).")


def inspect_model(path: Path, name: str) -> ServedModel:
    """Check that `path` is a servable HF directory (config, safetensors, tokenizer, no remote code) and describe it."""
    path = Path(path).resolve()
    if not path.is_dir():
        raise ServeError(f"{path}: not a directory. Give a local HF model directory or NAME@ALIAS from the registry.")
    adapter_config = path / "adapter_config.json"
    if adapter_config.exists():
        _check_weights(path, "adapter_model.safetensors")
        adapter = _read_json(adapter_config)
        base = Path(adapter.get("base_model_name_or_path") or "")
        if not (base / "config.json").exists():
            raise ServeError(f"{adapter_config}: base_model_name_or_path {str(base)!r} is not a local model directory; the adapter cannot be served without its base.")
        inspect_model(base, name)
        return ServedModel(path=path, name=name, adapter_base=base, lora_rank=int(adapter.get("r") or 0))
    config_file = path / "config.json"
    if not config_file.exists():
        raise ServeError(f"{path}: no config.json; not a Hugging Face model directory.")
    config = _read_json(config_file)
    if config.get("auto_map"):
        raise ServeError(f"{config_file}: auto_map asks for the model's own Python code; remote code is never trusted here.")
    _check_weights(path, "*.safetensors")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ServeError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json); the server cannot encode prompts.")
    quant = (config.get("quantization_config") or {}).get("quant_method", "")
    return ServedModel(path=path, name=name, quantization=str(quant))


SPECULATIVE_OFF = ("", "off")
FROM_DISTILL = "distill"  # serve.speculative: distill = paths.student_model


def draft_dir(spec: str, paths: PathsConfig) -> Path | None:
    """The draft model directory `serve.speculative` names: None for off, paths.student_model for `distill`, else a
    directory (relative to the repository root)."""
    spec = spec.strip()
    if spec.lower() in SPECULATIVE_OFF:
        return None
    if spec == FROM_DISTILL:
        return paths.student_model
    path = Path(spec).expanduser()
    return path if path.is_absolute() else paths.root / path


def _tokenizer_file(model_dir: Path) -> bytes | None:
    path = Path(model_dir) / "tokenizer.json"
    return path.read_bytes() if path.is_file() else None


def with_draft(served: ServedModel, cfg: ServeConfig, paths: PathsConfig) -> ServedModel:
    """`served` with the draft `serve.speculative` names, checked: servable (safetensors, no remote code), the same
    vocabulary and tokenizer as the served model (the target verifies the draft's token ids as its own)."""
    path = draft_dir(cfg.speculative, paths)
    if path is None:
        return served
    if not (path / "config.json").is_file():
        hint = " Run the distill stage first (`dvc repro distill`)." if cfg.speculative.strip() == FROM_DISTILL else ""
        raise ServeError(f"serve.speculative={cfg.speculative!r}: {path} is not a model directory (no config.json).{hint}")
    draft = inspect_model(path, f"{served.name}-draft")
    target_dir = served.adapter_base or served.path
    vocab = [json.loads((d / "config.json").read_text()).get("vocab_size") for d in (target_dir, draft.path)]
    if vocab[0] != vocab[1] or _tokenizer_file(target_dir) != _tokenizer_file(draft.path):
        raise ServeError(
            f"serve.speculative: the draft {draft.path} does not share the served model's tokenizer (vocab_size {vocab[1]} vs "
            f"{vocab[0]}, or tokenizer.json differs); a draft must use the target's token ids. Use the distilled student "
            "of this model (serve.speculative: distill)."
        )
    return replace(served, draft=draft.path)


# `make vllm` builds it beside .venv: vLLM pins its own torch and compressed-tensors, which llm-compressor's pins exclude.
VLLM_VENV = Path(sys.executable).parents[2] / ".venv-vllm"


def vllm_executable() -> str | None:
    """`vllm` from $LLMOPS_VLLM_BIN, this environment, the project's .venv-vllm (`make vllm`), or PATH; None if none has it."""
    candidates = [env.get(env.VLLM_BIN), str(Path(sys.executable).parent / "vllm"), str(VLLM_VENV / "bin" / "vllm")]
    found = next((c for c in candidates if c and Path(c).is_file()), None)
    return found or shutil.which("vllm")


def vllm_installed() -> bool:
    return vllm_executable() is not None


def gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_backend(requested: str) -> str:
    """auto -> vllm where vLLM is installed and a GPU is present, else transformers."""
    if requested == "auto":
        return "vllm" if vllm_installed() and gpu_present() else "transformers"
    if requested == "vllm" and not vllm_installed():
        raise ConfigError(
            "serve.backend=vllm: no `vllm` executable found ($LLMOPS_VLLM_BIN, this venv, .venv-vllm, PATH). On a GPU host run "
            "`make vllm` (vLLM in its own venv: it pins torch 2.14 and a compressed-tensors that llm-compressor excludes); on CPU use --backend transformers."
        )
    if requested not in ("vllm", "transformers"):
        raise ConfigError(f"serve.backend={requested!r}: expected auto, vllm or transformers")
    return requested


def vllm_speculative_config(draft: Path, num_speculative_tokens: int) -> str:
    """vLLM's `--speculative-config` JSON for a separate draft model (docs.vllm.ai, features/speculative_decoding/draft_model)."""
    return json.dumps({"model": str(draft), "num_speculative_tokens": num_speculative_tokens, "method": "draft_model"})


def vllm_command(model: ServedModel, cfg: ServeConfig, uds: Path) -> list[str]:
    """`vllm serve` on the Unix socket `uds` (no TCP port). Compressed-tensors checkpoints need no --quantization: vLLM reads their config."""
    weights = model.adapter_base or model.path
    cmd = [
        vllm_executable() or "vllm", "serve", str(weights),
        "--uds", str(uds),
        "--max-model-len", str(cfg.max_model_len),
        "--tensor-parallel-size", str(cfg.tensor_parallel_size),
        "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
        "--generation-config", "vllm",  # our sampling defaults, not whatever generation_config.json holds
        "--load-format", "safetensors",
    ]  # fmt: skip
    if model.adapter_base is not None:
        rank = max(cfg.max_lora_rank, model.lora_rank)
        cmd += ["--served-model-name", f"{model.name}-base", "--enable-lora", "--lora-modules", f"{model.name}={model.path}", "--max-lora-rank", str(rank)]
    else:
        cmd += ["--served-model-name", model.name]
    if model.draft is not None:
        cmd += ["--speculative-config", vllm_speculative_config(model.draft, cfg.num_speculative_tokens)]
    return cmd


def transformers_command(model: ServedModel, cfg: ServeConfig, uds: Path) -> list[str]:
    """`transformers serve`'s app with the model preloaded and continuous batching on, on the Unix socket `uds` (llmops.serving.cpu_backend)."""
    if model.adapter_base is not None:
        raise ServeError(
            f"{model.path} is a LoRA adapter: the transformers backend serves full models. Serve the merged model "
            "(paths.finetune_model) or use --backend vllm, which serves adapters with --enable-lora."
        )
    cmd = [
        sys.executable, "-m", "llmops.serving.cpu_backend", str(model.path),
        "--uds", str(uds),
        "--device", cfg.device,
        "--cb-block-size", str(cfg.cb_block_size),
        "--log-level", "warning",
    ]  # fmt: skip
    # Left unset, the KV cache is sized from free memory: on a CPU host that allocates most of RAM on the first request.
    if cfg.cb_num_blocks:
        cmd += ["--cb-num-blocks", str(cfg.cb_num_blocks)]
    if cfg.cb_max_batch_tokens:
        cmd += ["--cb-max-batch-tokens", str(cfg.cb_max_batch_tokens)]
    if cfg.torch_threads:
        cmd += ["--torch-threads", str(cfg.torch_threads)]
    if model.draft is not None:  # assisted generation: requests are served one at a time (see cpu_backend)
        cmd += ["--draft", str(model.draft), "--num-speculative-tokens", str(cfg.num_speculative_tokens)]
    return cmd


def backend_command(backend: str, model: ServedModel, cfg: ServeConfig, uds: Path) -> list[str]:
    return vllm_command(model, cfg, uds) if backend == "vllm" else transformers_command(model, cfg, uds)


def context_tokens(backend: str, model: ServedModel, cfg: ServeConfig) -> int:
    """Prompt + generated tokens one request may hold: the model's max_position_embeddings (vLLM: also --max-model-len)."""
    config = _read_json((model.adapter_base or model.path) / "config.json")
    positions = config.get("max_position_embeddings") or (config.get("text_config") or {}).get("max_position_embeddings")
    if backend == "vllm":
        return min(cfg.max_model_len, int(positions)) if positions else cfg.max_model_len
    if not positions:
        raise ServeError(f"{model.path}/config.json has no max_position_embeddings: the proxy cannot bound prompt + max_tokens.")
    return int(positions)


def kv_cache_blocks(backend: str, cfg: ServeConfig) -> int:
    """KV-cache blocks the proxy shares out among requests (transformers backend with a fixed cache); 0 = the backend manages its own."""
    return cfg.cb_num_blocks if backend == "transformers" else 0


def tokenizer_dir(model: ServedModel) -> Path:
    """Where the served tokenizer lives: the adapter's own when it has one, else the model's (the adapter's base)."""
    if model.adapter_base is not None and not (model.path / "tokenizer.json").exists():
        return model.adapter_base
    return model.path


def backend_model_id(backend: str, model: ServedModel) -> str:
    """The model name the backend itself expects in requests: vLLM takes the served name, transformers serve its path."""
    return model.name if backend == "vllm" else str(model.path)

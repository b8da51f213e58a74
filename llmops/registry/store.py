"""The MLflow model registry as the project uses it: model names, aliases, and registry versions as local HF directories.

A version is logged twice by its register run: the MLflow transformers flavor (so
`mlflow.transformers.load_model("models:/NAME@champion")` gives a text-generation pipeline) and the
plain HF directory as run artifacts under `hf/` (config.json + safetensors + tokenizer files, what
vLLM and `transformers serve` load as is). `resolve` downloads the latter. Everything goes through
MlflowClient, so a local `sqlite:///mlflow.db` store and an `mlflow server` behave the same.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmops.params.paths import PathsConfig
from llmops.params.register import RegisterConfig
from llmops.params.tracking import TrackingConfig
from llmops.common.errors import RegistryError

HF_ARTIFACT = "hf"  # run artifact path of a version's plain HF directory (tag llmops.hf_artifact holds it)
FLAVOR_ARTIFACT = "model"  # name of the logged transformers-flavor model
SOURCE_FILE = ".registry.json"  # written into a download: which run it came from (a stale copy is re-fetched)
MODEL_URI_PREFIX = "models:/"
ENDPOINT_TAG = "llmops.endpoint"  # on a version while a server of ours serves it: the public base URL
DEPLOY_RUN_TAG = "llmops.deploy_run"  # on a version the deploy flow promoted to production: that deploy's MLflow run


@dataclass(frozen=True)
class ModelRef:
    name: str  # registered model name ("" for a plain local path)
    version: str  # registry version ("" for a local path)
    path: Path  # local HF model directory (config.json + safetensors + tokenizer files)
    run_id: str  # MLflow run that logged this version ("" for a local path)
    tags: dict[str, str] = field(default_factory=dict)  # the version's tags (lineage)


@dataclass(frozen=True)
class Store:
    """Where registered models live and where their files are downloaded to."""

    uri: str  # the MLflow tracking URI; the registry is on the same store
    root: Path  # the repository root: a local model directory in a spec is relative to it
    downloads: Path  # resolve() puts a version's files under <downloads>/<name>/<version>/

    @classmethod
    def of(cls, tracking: TrackingConfig, paths: PathsConfig) -> Store:
        from llmops.common.tracking import tracking_uri

        return cls(uri=tracking_uri(tracking, paths.root), root=paths.root, downloads=paths.registry)


def model_name(cfg: RegisterConfig, scheme: str = "") -> str:
    """The registered model name: `llmops-code`, or `llmops-code-w8a8` for a quantized variant."""
    base = cfg.model_name
    return f"{base}-{scheme.lower()}" if scheme else base


def parse_spec(spec: str) -> tuple[str, str]:
    """'NAME@ALIAS', 'NAME@3', 'models:/NAME@ALIAS' or 'models:/NAME/3' -> (name, alias_or_version)."""
    text = spec.strip()
    if text.startswith(MODEL_URI_PREFIX):
        text = text[len(MODEL_URI_PREFIX) :]
        if "@" not in text and "/" in text:
            text = "@".join(text.rsplit("/", 1))
    name, sep, ref = text.rpartition("@")
    if not sep or not name or not ref:
        raise RegistryError(
            f"model spec {spec!r}: expected NAME@ALIAS or NAME@VERSION (e.g. llmops-code@champion, llmops-code@3), "
            "models:/NAME@ALIAS, or an existing local model directory"
        )
    return name, ref


def client(store: Store) -> Any:
    """An MlflowClient on the project's tracking store (MLFLOW_TRACKING_URI wins), registry on the same store.

    The fluent API (download_artifacts, register_model, load_model) follows the tracking URI set here; the registry
    URI is left unset so it always follows the tracking URI, never a store an earlier call pointed at.
    """
    import mlflow

    uri = store.uri
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _not_found(exc: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")


def _known_aliases(mlflow_client: Any, name: str) -> str:
    try:
        aliases = mlflow_client.get_registered_model(name).aliases
    except Exception:
        return "none"
    return ", ".join(f"{a}->v{v}" for a, v in sorted(aliases.items())) or "none"


def get_version(name: str, ref: str, store: Store) -> Any:
    """The MLflow ModelVersion for an alias or a version number; RegistryError naming what exists otherwise."""
    mlflow_client = client(store)
    try:
        if ref.isdigit():
            return mlflow_client.get_model_version(name, ref)
        return mlflow_client.get_model_version_by_alias(name, ref)
    except Exception as exc:
        if not _not_found(exc):
            raise
    try:
        mlflow_client.get_registered_model(name)
    except Exception as exc:
        if not _not_found(exc):
            raise
        raise RegistryError(
            f"registered model {name!r} does not exist in {mlflow_client.tracking_uri}; run the pipeline (`llmops run`) "
            "to register one, or check register.model_name in params.yaml"
        ) from None
    what = f"version {ref}" if ref.isdigit() else f"alias {ref!r}"
    raise RegistryError(f"registered model {name!r} has no {what} (aliases: {_known_aliases(mlflow_client, name)})")


def alias_version(name: str, alias: str, store: Store) -> str | None:
    """The version an alias points at, or None when the model or the alias does not exist."""
    try:
        return str(get_version(name, alias, store).version)
    except RegistryError:
        return None


def set_alias(name: str, alias: str, version: str, store: Store) -> None:
    valid_alias(alias)  # before connecting: a bad alias is a config mistake, not a store problem
    client(store).set_registered_model_alias(name, alias, str(version))


def record_endpoint(name: str, version: str, url: str, store: Store) -> None:
    """Tag the version with the URL a server now serves it at (`llmops lineage` shows it and checks it answers)."""
    client(store).set_model_version_tag(name, str(version), ENDPOINT_TAG, url)


def clear_endpoint(name: str, version: str, url: str, store: Store) -> None:
    """Drop the endpoint tag when the server at `url` stops, unless another server of that version has recorded its own since."""
    mlflow_client = client(store)
    if (mlflow_client.get_model_version(name, str(version)).tags or {}).get(ENDPOINT_TAG) == url:
        mlflow_client.delete_model_version_tag(name, str(version), ENDPOINT_TAG)


def delete_alias(name: str, alias: str, store: Store) -> None:
    """Remove an alias; nothing happens when it does not exist."""
    try:
        client(store).delete_registered_model_alias(name, alias)
    except Exception as exc:
        if not _not_found(exc):
            raise


def quantized_version(name: str, base_version: str, scheme: str, store: Store) -> Any:
    """The newest version of `<name>-<scheme>` whose tag llmops.base_version is `base_version`."""
    quant_name = f"{name}-{scheme.lower()}"
    versions = client(store).search_model_versions(f"name = '{quant_name}' and tags.`llmops.base_version` = '{base_version}'")
    if not versions:
        raise RegistryError(
            f"{name} version {base_version} has no registered {scheme} variant (no version of {quant_name!r} tagged "
            f"llmops.base_version={base_version}); quantize it and re-run register (`llmops run`)"
        )
    return max(versions, key=lambda v: int(v.version))


def _complete(path: Path, run_id: str) -> bool:
    try:
        source = json.loads((path / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return source.get("run_id") == run_id and (path / "config.json").exists()


def download(version: Any, dest: Path, store: Store) -> Path:
    """The version's plain HF directory under `dest`, fetched to a temp directory then renamed; a complete earlier
    download of the same run is reused."""
    import mlflow

    from llmops.common.io import atomic_dir

    if _complete(dest, version.run_id):
        return dest
    artifact = (version.tags or {}).get("llmops.hf_artifact", HF_ARTIFACT)
    client(store)
    with atomic_dir(dest) as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=artifact, dst_path=str(tmp)))
        except Exception as exc:
            raise RegistryError(
                f"{version.name} version {version.version}: cannot download its HF directory (run {version.run_id}, "
                f"artifact {artifact!r}): {exc}"
            ) from None
        if not (local / "config.json").exists():
            raise RegistryError(f"{version.name} version {version.version}: artifact {artifact!r} of run {version.run_id} has no config.json")
        for item in local.iterdir():
            os.replace(item, tmp / item.name)
        local.rmdir()
        (tmp / SOURCE_FILE).write_text(json.dumps({"name": version.name, "version": str(version.version), "run_id": version.run_id}) + "\n")
    return dest


def resolve(spec: str, store: Store, *, quantized: str = "", dest: Path | None = None) -> ModelRef:
    """A model spec as a local HF directory.

    spec: "NAME@ALIAS", "NAME@VERSION", "models:/NAME@ALIAS", or an existing local HF directory (returned as is).
    quantized="w8a8" resolves the `<name>-w8a8` version registered from that version (tag llmops.base_version).
    The files go to `dest` (default `<paths.registry>/<name>/<version>/`).
    """
    local = Path(spec).expanduser()
    local = local if local.is_absolute() else store.root / local
    if not spec.startswith(MODEL_URI_PREFIX) and quantized and (local / quantized.lower() / "config.json").is_file():
        return ModelRef(name="", version="", path=local / quantized.lower(), run_id="", tags={})  # e.g. models/quantized + w8a8
    if not spec.startswith(MODEL_URI_PREFIX) and (local / "config.json").is_file():
        if quantized:
            raise RegistryError(f"{spec}: a local model directory with no {quantized.lower()}/ subdirectory; pass the quantized directory itself")
        return ModelRef(name="", version="", path=local, run_id="", tags={})
    if not spec.startswith(MODEL_URI_PREFIX) and not quantized and (local / "adapter_config.json").is_file():
        return ModelRef(name="", version="", path=local, run_id="", tags={})  # a LoRA adapter: vLLM serves it with --enable-lora
    if not spec.startswith(MODEL_URI_PREFIX) and "@" not in spec and (local.exists() or os.sep in spec):
        raise RegistryError(f"{spec}: not a model directory (no config.json) and not a registry spec NAME@ALIAS")
    name, ref = parse_spec(spec)
    version = get_version(name, ref, store)
    if quantized:
        version = quantized_version(name, str(version.version), quantized, store)
    target = Path(dest) if dest is not None else store.downloads / version.name / str(version.version)
    path = download(version, target, store)
    return ModelRef(name=version.name, version=str(version.version), path=path, run_id=version.run_id, tags=dict(version.tags or {}))


def log_version(
    name: str,
    model_dir: Path,
    store: Store,
    *,
    tags: dict[str, str],
    artifact: str = HF_ARTIFACT,
    flavor: bool = True,
    metrics: dict[str, float] | None = None,
) -> Any:
    """Register `model_dir` (an HF directory) as a new version of `name` from the active MLflow run.

    Logs the directory as run artifacts under `artifact` and, with `flavor`, the transformers flavor
    (task text-generation, logged from the directory without loading the model) with `metrics` attached
    to the logged model, so the MLflow UI compares models side by side; returns the ModelVersion.
    """
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RegistryError("log_version needs an active MLflow run (the register stage's run)")
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise RegistryError(f"{model_dir}: not an HF model directory (config.json missing); nothing to register as {name}")
    mlflow_client = client(store)
    mlflow.log_artifacts(str(model_dir), artifact_path=artifact)
    tags = {**tags, "llmops.hf_artifact": artifact, "llmops.source_dir": str(model_dir)}
    if flavor:
        info = mlflow.transformers.log_model(
            str(model_dir), name=FLAVOR_ARTIFACT if artifact == HF_ARTIFACT else f"{FLAVOR_ARTIFACT}-{artifact}",
            task="text-generation", pip_requirements=pip_requirements(model_dir),
        )
        if metrics:
            mlflow.log_metrics(metrics, model_id=info.model_id)
        version = mlflow.register_model(info.model_uri, name, tags=tags)
    else:
        try:
            mlflow_client.create_registered_model(name)
        except Exception as exc:
            from mlflow.exceptions import MlflowException

            if not (isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_ALREADY_EXISTS"):
                raise
        source = f"{run.info.artifact_uri.rstrip('/')}/{artifact}"
        version = mlflow_client.create_model_version(name, source=source, run_id=run.info.run_id, tags=tags)
    return mlflow_client.get_model_version(name, str(version.version))


def pip_requirements(model_dir: Path) -> list[str]:
    """What loading the model needs, pinned to this environment (MLflow's default list wants torchvision, which a
    text model does not use and this environment does not have)."""
    from importlib.metadata import PackageNotFoundError, version

    packages = ["transformers", "torch", "accelerate", "safetensors", "tokenizers"]
    if "quantization_config" in json.loads((Path(model_dir) / "config.json").read_text()):
        packages.append("compressed-tensors")
    pins = []
    for package in packages:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def valid_alias(alias: str) -> str:
    """MLflow reserves aliases of the form v<number> (they name versions)."""
    if re.fullmatch(r"v\d+", alias) or not re.fullmatch(r"[A-Za-z0-9_\-]+", alias):
        raise RegistryError(f"alias {alias!r}: use letters, digits, _ and - (v<number> is reserved by MLflow)")
    return alias


def list_versions(name: str, store: Store) -> list[dict[str, str]]:
    """Every version of `name` and of its quantized variants (`name-*`), newest first, with aliases and key tags."""
    mlflow_client = client(store)
    models = [m for m in mlflow_client.search_registered_models(f"name LIKE '{name}%'") if m.name == name or m.name.startswith(f"{name}-")]
    rows = []
    for model in sorted(models, key=lambda m: m.name):
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        for version in sorted(mlflow_client.search_model_versions(f"name = '{model.name}'"), key=lambda v: -int(v.version)):
            tags = version.tags or {}
            rows.append({
                "name": model.name,
                "version": str(version.version),
                "aliases": ",".join(sorted(aliases.get(str(version.version), []))),
                "pass_at_1": tags.get("llmops.metric.pass_at_1", ""),
                "perplexity": tags.get("llmops.metric.perplexity", ""),
                "base_version": tags.get("llmops.base_version", ""),
                "git_commit": tags.get("llmops.git_commit", "")[:10],
                "eval_data": tags.get("llmops.eval_data", "")[:10],
                "run_id": version.run_id or "",
            })
    return rows

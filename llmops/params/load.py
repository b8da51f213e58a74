"""params.yaml as one typed model: `Params` holds one section model per top-level key (llmops/params/<section>.py),
`load_params` reads and validates the file, `--set` overrides are validated as a whole and then written into it for
good, comments kept (as `dvc exp run --set-param` does), or not written at all."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmops.common.errors import ConfigError
from llmops.params.align import AlignConfig
from llmops.params.base import Section
from llmops.params.dedup import DedupConfig
from llmops.params.distill import DistillConfig
from llmops.params.evaluate import EvaluateConfig
from llmops.params.finetune import FinetuneConfig
from llmops.params.ingest import IngestConfig
from llmops.params.model import ModelConfig
from llmops.params.monitor import MonitorConfig
from llmops.params.paths import PathsConfig
from llmops.params.pipeline import PipelineConfig
from llmops.params.pretrain import PretrainConfig
from llmops.params.quantize import QuantizeConfig
from llmops.params.register import RegisterConfig
from llmops.params.serve import ServeConfig
from llmops.params.tokenize import TokenizeConfig
from llmops.params.tracking import TrackingConfig
from llmops.params.train import TrainConfig
from llmops.params.validate import ValidateConfig

PARAMS_FILE = "params.yaml"

# `register` is also ABCMeta.register on the class (not on instances, where the field wins): the warning is noise.
warnings.filterwarnings("ignore", message='Field name "register" in "Params" shadows', category=UserWarning)


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
    align: AlignConfig = AlignConfig()
    distill: DistillConfig = DistillConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    register: RegisterConfig = RegisterConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def section(self, key: str) -> Section:
        """The section model under the params.yaml key `key` (`validate` is the field `validate_`)."""
        for name, field in type(self).model_fields.items():
            if (field.alias or name) == key:
                return getattr(self, name)
        raise ConfigError(f"params.yaml has no section {key!r}; sections: {', '.join(_allowed_keys(type(self)))}")

    def as_params(self) -> dict[str, Any]:
        """Every value as params.yaml holds it (YAML keys, relative paths): what is logged to MLflow."""
        dumped = self.model_dump(by_alias=True, mode="json")
        dumped["paths"] = self.paths.as_params()
        return dumped


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


def parse_params(raw: dict[str, Any], source: str = PARAMS_FILE, root: Path | None = None) -> Params:
    """Validate a params mapping; every error names the key path, the rule, and the allowed keys.

    With `root`, `paths` are made absolute against it (see PathsConfig.under) and must lie below it
    (PathsConfig.outside_root).
    """
    try:
        params = Params.model_validate(raw or {})
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
    if root is None:
        return params
    paths = params.paths.under(root)
    if problems := paths.outside_root():
        raise ConfigError(
            f"{source}: {'; '.join(problems)}. "
            "Every path must resolve, symlinks followed, to a folder below the repository root (the folder holding params.yaml): "
            "stages replace these folders, and DVC tracks no output outside the repository. Use a path under the root, or list "
            "the key in paths.allow_outside_root to keep that folder outside on purpose (e.g. checkpoints on a scratch disk)."
        )
    return params.model_copy(update={"paths": paths})


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false, so `off`, `no` and `on` stay strings.

    DVC reads and rewrites params.yaml as YAML 1.2 (`dvc exp run -S serve.speculative=off` writes a bare `off`), so
    llmops reads the same file the same way."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], value parsed as a YAML scalar, so 0.5 is a float and true a bool)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set dedup.threshold=0.8")
    key, value = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        return parts, load_yaml(value) if value.strip() else ""
    except yaml.YAMLError as exc:
        where = f" at column {exc.problem_mark.column + 1}" if getattr(exc, "problem_mark", None) else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"--set {item!r}: the value {value!r} for {'.'.join(parts)} is not valid YAML ({problem}{where}); "
            f"quote a string value: --set '{'.'.join(parts)}=\"...\"'"
        ) from None


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


def _read_raw(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: not found. Run from the repository root, or pass --params PATH.")
    return _parse_yaml(path.read_text(), path)


def _parse_yaml(text: str, path: Path) -> dict[str, Any]:
    try:
        raw = load_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_params(path: Path | str = PARAMS_FILE, overrides: list[str] | None = None) -> Params:
    """params.yaml at `path` (plus `overrides`), with every path resolved against the folder that holds it."""
    path = Path(path)
    return parse_params(apply_overrides(_read_raw(path), overrides or []), source=str(path), root=path.resolve().parent)


def write_overrides(path: Path, overrides: list[str]) -> None:
    """Write --set overrides into params.yaml for good, keeping its comments, so DVC sees the new params.

    This is what `dvc exp run --set-param` does too: DVC tracks params by file content, so `dvc repro` later reproduces
    the run and dvc.lock matches params.yaml. The new text is validated whole (it must load to exactly the params the
    overrides describe) before one atomic rename: a bad override leaves the file byte for byte as it was.
    """
    import io

    from ruamel.yaml import YAML

    from llmops.common.io import atomic_write_bytes

    path = Path(path)
    expected = load_params(path, overrides)
    ryaml = YAML()
    ryaml.preserve_quotes = True
    doc = ryaml.load(path.read_text()) or {}
    for item in overrides:
        parts, value = parse_override(item)
        node = doc
        for part in parts[:-1]:
            if part not in node:
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    buf = io.StringIO()
    ryaml.dump(doc, buf)
    written = parse_params(_parse_yaml(buf.getvalue(), path), source=str(path), root=path.resolve().parent)
    if written != expected:
        raise ConfigError(f"{path}: writing {' '.join(overrides)} would not give the params they describe; the file is left as it was")
    atomic_write_bytes(path, buf.getvalue().encode())

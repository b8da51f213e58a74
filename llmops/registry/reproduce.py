"""Reproduce a registered version: its git commit in a temporary worktree, exactly its data versions, the model stages re-run.

From the version's lineage tags: `git worktree add` at `llmops.git_commit`, params.yaml from the register run when
the committed one differs from `llmops.params_md5`, every cached DVC output restored to its `llmops.dvc.<path>` md5
(`dvc checkout` from the shared cache, else `dvc pull` from the default remote; a version found in neither is a
ReproduceError naming the path and md5), then `dvc repro --force --single-item` for pretrain, finetune and evaluate.
DVC trusts its cache, so every object a version restores from is hashed first (a cache file changed in place is a
ReproduceError naming the file, the expected and the actual md5, and nothing is checked out), and every file checked
out is hashed again against its recorded md5.
Each deterministic metric of those stages is compared with the registered runs' `metrics/<stage>.json` artifacts, and
each output they wrote (models, adapter, reports) with the md5 the version was registered with.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmops.common import env
from llmops.common.fingerprints import file_md5
from llmops.common.stages import MODEL_STAGES, metrics_file, stage_named
from llmops.common.tracking import flatten
from llmops.params.paths import PathsConfig
from llmops.registry import store as registry
from llmops.registry.store import Store
from llmops.common.errors import LlmopsError

# How fast a stage ran, not what it computed: never compared.
TIMING_KEY = re.compile(r"(seconds|_s$|per_s|mfu|resumed_from_step|processes)")


class ReproduceError(LlmopsError):
    """A registered version cannot be reproduced: a missing commit, data version, or run artifact."""


@dataclass(frozen=True)
class Comparison:
    stage: str
    metric: str
    registered: float
    reproduced: float | None
    tolerance: float

    @property
    def match(self) -> bool:
        if self.reproduced is None:
            return False
        if math.isnan(self.registered) or math.isnan(self.reproduced):
            return math.isnan(self.registered) and math.isnan(self.reproduced)
        return abs(self.registered - self.reproduced) <= self.tolerance * max(1.0, abs(self.registered))


def comparable_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric, deterministic entries of a metrics file (nested keys dotted); timings and flags left out."""
    return {
        k: float(v)
        for k, v in flatten("", metrics).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and not TIMING_KEY.search(k.rsplit(".", 1)[-1])
    }


def compare(stage: str, registered: dict[str, Any], reproduced: dict[str, Any], tolerance: float) -> list[Comparison]:
    ours = comparable_metrics(reproduced)
    return [Comparison(stage, k, v, ours.get(k), tolerance) for k, v in sorted(comparable_metrics(registered).items())]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def data_versions(tags: dict[str, str]) -> dict[str, str]:
    return {k[len("llmops.dvc.") :]: v for k, v in tags.items() if k.startswith("llmops.dvc.")}


def cache_object(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def cache_has(cache: Path, md5: str) -> bool:
    """Whether a DVC 3 cache (or a local remote, same layout) holds `md5` and, for a directory, every file in it."""
    obj = cache_object(cache, md5)
    if not obj.exists():
        return False
    if md5.endswith(".dir"):
        return all(cache_object(cache, e["md5"]).exists() for e in json.loads(obj.read_text()))
    return True


def _check_md5(file: Path, expected: str, what: str) -> None:
    actual = file_md5(file) if file.is_file() else "(missing)"
    if actual != expected:
        raise ReproduceError(
            f"{what}: {file} has md5 {actual}, expected {expected} (recorded for this data version). The DVC cache was changed in "
            "place or is damaged: delete that cache file and `dvc pull` it from the remote, or re-run the stage that wrote it."
        )


def verify_cached(cache: Path, path: str, md5: str) -> None:
    """Hash every cache object the version `md5` of output `path` restores from (a cache object is named by its md5)."""
    listing = cache_object(cache, md5)
    _check_md5(listing, md5.removesuffix(".dir"), f"{path} (the directory listing)" if md5.endswith(".dir") else path)
    if md5.endswith(".dir"):
        for entry in json.loads(listing.read_text()):
            _check_md5(cache_object(cache, entry["md5"]), entry["md5"], f"{path}/{entry['relpath']}")


def verify_restored(cache: Path, worktree: Path, path: str, md5: str) -> None:
    """Hash every file of output `path` as checked out in `worktree` against the md5 recorded for it."""
    if not md5.endswith(".dir"):
        _check_md5(worktree / path, md5, f"restored {path}")
        return
    for entry in json.loads(cache_object(cache, md5).read_text()):
        _check_md5(worktree / path / entry["relpath"], entry["md5"], f"restored {path}/{entry['relpath']}")


def differing_files(cache: Path, registered: str | None, reproduced: str | None) -> list[str] | None:
    """Files that differ between two versions of a directory output (None when a listing is not in the cache)."""
    if not (registered and reproduced and registered.endswith(".dir") and reproduced.endswith(".dir")):
        return None
    listings = []
    for md5 in (registered, reproduced):
        obj = cache_object(cache, md5)
        if not obj.exists():
            return None
        listings.append({e["relpath"]: e["md5"] for e in json.loads(obj.read_text())})
    a, b = listings
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def create_worktree(repo: Path, commit: str, dest: Path) -> Path:
    if _run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], repo).returncode != 0:
        raise ReproduceError(f"git commit {commit} (tag llmops.git_commit) is not in {repo}; fetch it (`git fetch`) and retry.")
    out = _run(["git", "worktree", "add", "--detach", str(dest), commit], repo)
    if out.returncode != 0:
        raise ReproduceError(f"git worktree add {dest} {commit} failed: {out.stderr.strip()}")
    return dest


def restore_params(worktree: Path, tags: dict[str, str], run_id: str, store: Store) -> str:
    """params.yaml as the registered run had it (the committed one, or the register run's artifact when they differ)."""
    import mlflow

    target = worktree / "params.yaml"
    wanted = tags.get("llmops.params_md5", "")
    if target.is_file() and file_md5(target) == wanted:
        return "params.yaml from the commit"
    registry.client(store)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="params.yaml", dst_path=tmp))
        except Exception as exc:
            raise ReproduceError(f"params.yaml at the commit differs from llmops.params_md5 {wanted} and the register run {run_id} has no params.yaml artifact: {exc}") from None
        if (actual := file_md5(local)) != wanted:  # checked before it replaces the commit's params.yaml
            raise ReproduceError(f"params.yaml artifact of run {run_id} has md5 {actual}, expected llmops.params_md5 {wanted}")
        shutil.copy(local, target)
    return f"params.yaml from register run {run_id} (the commit's differed)"


def dvc_cache_dir(repo: Path, env: dict[str, str]) -> Path:
    return Path(_run([sys.executable, "-m", "dvc", "cache", "dir"], repo, env).stdout.strip() or repo / ".dvc" / "cache")


def cached_outputs(worktree: Path) -> dict[str, tuple[str, list[str]]]:
    """Per dvc.yaml stage: its command and the outputs DVC caches (metrics files are not cached; they are compared by value)."""
    from dvc.repo import Repo

    with Repo(str(worktree)) as dvc_repo:
        return {stage.name: (stage.cmd, [str(out.def_path) for out in stage.outs if out.use_cache]) for stage in dvc_repo.index.stages}


def restore_data(repo: Path, worktree: Path, versions: dict[str, str], env: dict[str, str]) -> list[str]:
    """Check out every cached DVC output at the md5 its tag names; returns the restored paths.

    A dvc.lock holding just those outputs is written into the worktree, so `dvc checkout` / `dvc pull` restore
    exactly them (dvc.lock is a machine output, not in git).
    """
    repo_cache = dvc_cache_dir(repo, env)
    _run([sys.executable, "-m", "dvc", "config", "--local", "cache.dir", str(repo_cache)], worktree, env)
    stages: dict[str, Any] = {}
    restored: list[str] = []
    for name, (cmd, paths) in cached_outputs(worktree).items():
        outs = [{"path": path, "hash": "md5", "md5": versions[path]} for path in paths if path in versions]
        restored += [out["path"] for out in outs]
        if outs:
            stages[name] = {"cmd": cmd, "outs": outs}
    (worktree / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}, sort_keys=False))
    remote = _run([sys.executable, "-m", "dvc", "remote", "default"], worktree, env).stdout.strip()
    remote_url = _run([sys.executable, "-m", "dvc", "remote", "list"], worktree, env).stdout
    missing = [p for p in restored if not cache_has(repo_cache, versions[p])]
    if missing:
        pulled = _run([sys.executable, "-m", "dvc", "pull", "--allow-missing", *missing], worktree, env)
        still = [p for p in missing if not cache_has(repo_cache, versions[p])]
        if still:
            lines = "; ".join(f"{p} md5 {versions[p]}" for p in still)
            raise ReproduceError(
                f"data version(s) gone: {lines} (tag llmops.dvc.<path>) are neither in the DVC cache {repo_cache} nor on the "
                f"default remote {remote or '(none)'} [{' '.join(remote_url.split())}]. They were garbage-collected or never pushed: "
                f"`dvc push` from a checkout that still has them, or re-run the pipeline at that commit. dvc pull said: {pulled.stderr.strip()[-400:]}"
            )
    for path in restored:  # all of them before anything is checked out: a damaged version restores nothing
        verify_cached(repo_cache, path, versions[path])
    out = _run([sys.executable, "-m", "dvc", "checkout", "--force", *restored], worktree, env)
    if out.returncode != 0:
        raise ReproduceError(f"dvc checkout in {worktree} failed: {out.stderr.strip()[-1500:]}")
    for path in restored:
        verify_restored(repo_cache, worktree, path, versions[path])
    return restored


def registered_metrics(client: Any, tags: dict[str, str], stage: str, dest: Path) -> dict[str, Any]:
    name = stage_named(stage).metrics
    run_id = tags.get(f"llmops.run.{stage}")
    if not run_id:
        raise ReproduceError(f"the version has no llmops.run.{stage} tag: nothing to compare {stage} with")
    try:
        local = client.download_artifacts(run_id, f"metrics/{name}", str(dest))
    except Exception as exc:
        raise ReproduceError(f"run {run_id} ({stage}) has no metrics/{name} artifact: {exc}") from None
    return json.loads(Path(local).read_text())


def reproduce(spec: str, store: Store, paths: PathsConfig, *, tolerance: float = 1e-6, keep: bool = False) -> dict[str, Any]:
    """Re-run `spec`'s model stages at its commit on its data versions; returns comparisons and where it ran."""
    repo = paths.root
    name, ref = registry.parse_spec(spec)
    version = registry.get_version(name, ref, store)
    tags = dict(version.tags or {})
    client = registry.client(store)
    commit = tags.get("llmops.git_commit", "")
    if not commit or commit == "unknown":
        raise ReproduceError(f"{name} version {version.version} has no llmops.git_commit tag: it was not registered by the register stage")
    tmp = Path(tempfile.mkdtemp(prefix=f"llmops-reproduce-{name}-{version.version}-"))
    worktree = tmp / "repo"
    # The commit's own code first: `llmops stage` in the worktree must run what was registered.
    pythonpath = os.pathsep.join(p for p in (str(worktree), os.environ.get("PYTHONPATH", "")) if p)
    run_env = os.environ | {"PYTHONPATH": pythonpath, env.MLFLOW_TRACKING_URI: f"sqlite:///{tmp / 'mlflow.db'}", env.PROGRESS: "0"}
    run_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{run_env.get('PATH', '')}"
    run_env.pop(env.PARENT_RUN, None)
    create_worktree(repo, commit, worktree)
    worktree_paths = PathsConfig(**paths.as_params()).under(worktree)  # the same layout, in the worktree
    try:
        params_source = restore_params(worktree, tags, version.run_id, store)
        restored = restore_data(repo, worktree, data_versions(tags), run_env)
        comparisons: list[Comparison] = []
        for stage in MODEL_STAGES:
            out = _run([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", stage], worktree, run_env)
            if out.returncode != 0:
                raise ReproduceError(f"stage {stage} failed in {worktree}: {(out.stdout + out.stderr).strip()[-2000:]}")
            ours = json.loads(metrics_file(stage, worktree_paths).read_text())
            comparisons += compare(stage, registered_metrics(client, tags, stage, tmp), ours, tolerance)
        lock = yaml.safe_load((worktree / "dvc.lock").read_text())
        new_md5 = {o["path"]: o.get("md5") for s in lock["stages"].values() for o in s.get("outs", [])}
        cache, cached = dvc_cache_dir(repo, run_env), cached_outputs(worktree)
        outputs = {}
        for path in (path for stage in MODEL_STAGES for path in cached.get(stage, ("", []))[1]):
            registered, reproduced = tags.get(f"llmops.dvc.{path}"), new_md5.get(path)
            if registered:
                outputs[path] = {"registered": registered, "reproduced": reproduced, "differing_files": differing_files(cache, registered, reproduced)}
    finally:
        if not keep:
            _run(["git", "worktree", "remove", "--force", str(worktree)], repo)
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "spec": f"{name}@{version.version}",
        "commit": commit,
        "params": params_source,
        "restored": {p: data_versions(tags)[p] for p in restored},
        "comparisons": comparisons,
        "outputs": outputs,
        "match": bool(comparisons) and all(c.match for c in comparisons),
        "workdir": str(tmp) if keep else "",
    }

"""Readers for every source ingest takes (stdlib .py files, directory glob, JSONL, Parquet, HF dataset) and `ingest`,
which writes them as record shards (the ingest stage's data/raw/, the monitor's staged batches).

Every file read becomes records; a record ingest cannot decode or parse keeps its raw text
and an `ingest_error`, so `validate` quarantines it with the reason (nothing is dropped
silently). Files that cannot be read at all are listed in `skipped.jsonl` with the reason.
"""

from __future__ import annotations

import glob
import io
import json
import sysconfig
import tokenize as py_tokenize
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmops.params.ingest import IngestConfig
from llmops.common.errors import DataError
from llmops.common.io import ShardWriter, atomic_dir, atomic_write_bytes
from llmops.common.progress import progress

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
SKIPPED_FILE = "skipped.jsonl"
READ_BATCH_ROWS = 10_000  # rows of an HF dataset taken at a time


@dataclass
class Record:
    id: str
    text: str | None
    source: str
    meta: dict
    ingest_error: str | None = None


@dataclass
class IngestStats:
    files_read: int = 0
    bytes_read: int = 0
    skipped: list[dict] = field(default_factory=list)
    blank_lines: int = 0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def resolve_sources(source: str | list[str], file_glob: str, root: Path) -> list[tuple[str, Path, Path]]:
    """Expand ingest.source (paths relative to the repository `root`) into (label, base, file) triples in a stable order.

    `label` + the path relative to `base` make the record id, so ids do not depend on
    where the corpus or the checkout lives on this machine.
    """
    specs = [source] if isinstance(source, str) else list(source)
    out: list[tuple[str, Path, Path]] = []
    for spec in specs or [""]:
        if spec == "":  # the stdlib, also as one entry of a list (a retrain adds a batch beside it)
            stdlib = stdlib_root()
            files = [p for p in sorted(stdlib.glob(file_glob)) if p.is_file() and "site-packages" not in p.parts]
            out.extend(("stdlib", stdlib, p) for p in files)
            continue
        given = Path(spec).expanduser()
        path = given if given.is_absolute() else Path(root) / given
        if path.is_dir() and is_hf_dataset(path):
            out.append((path.name, path.parent, path))
        elif path.is_dir():
            files = [p for p in sorted(path.glob(file_glob)) if p.is_file()]
            out.extend((path.name, path, p) for p in files)
        elif path.is_file():
            out.append((path.parent.name or "file", path.parent, path))
        else:
            matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
            base_given = glob_base(given)
            base = base_given if base_given.is_absolute() else Path(root) / base_given
            out.extend((base_given.name or "glob", base, m) for m in matches if m.is_file() or is_hf_dataset(m))
    return out


def glob_base(pattern: Path) -> Path:
    """The directory part of a glob before its first wildcard: ids are relative to it."""
    parts = pattern.parts
    first_magic = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts) - 1)
    return Path(*parts[:first_magic]) if first_magic else Path(".")


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists())


def decode_source_file(data: bytes, path: Path) -> tuple[str, str | None]:
    """Decode bytes as the file's declared encoding (PEP 263 for .py), else UTF-8.

    Undecodable bytes become U+FFFD and an error naming the byte offset, so the record is
    quarantined downstream with the reason instead of vanishing.
    """
    encoding = "utf-8"
    if path.suffix == ".py":
        try:
            encoding, _ = py_tokenize.detect_encoding(io.BytesIO(data).readline)
        except SyntaxError as exc:
            return data.decode("utf-8", "replace"), f"bad encoding declaration: {exc}"
    try:
        return data.decode(encoding), None
    except (UnicodeDecodeError, LookupError) as exc:
        where = f" at byte {exc.start}" if isinstance(exc, UnicodeDecodeError) else ""
        return data.decode("utf-8", "replace"), f"not valid {encoding}{where}"


def read_text_file(label: str, root: Path, path: Path, data: bytes) -> Iterator[Record]:
    rel = path.relative_to(root).as_posix()
    text, error = decode_source_file(data, path)
    yield Record(f"{label}/{rel}", text, f"{label}/{rel}", {"path": rel, "bytes": len(data)}, error)


def _lines(path: Path) -> Iterator[bytes]:
    """The file's lines without their newline, read as a stream; like bytes.split(b"\\n"), a file ending in a newline
    (or an empty file) ends with one empty line."""
    ended_with_newline = True
    with open(path, "rb") as f:
        for line in f:
            ended_with_newline = line.endswith(b"\n")
            yield line[:-1] if ended_with_newline else line
    if ended_with_newline:
        yield b""


def read_jsonl(label: str, root: Path, path: Path, cfg: IngestConfig, stats: IngestStats) -> Iterator[Record]:
    """One record per line, streamed: memory holds one line, whatever the file's size."""
    rel = path.relative_to(root).as_posix()
    for lineno, raw_line in enumerate(_lines(path), start=1):
        if not raw_line.strip():
            stats.blank_lines += 1
            continue
        locator = f"{label}/{rel}:{lineno}"
        meta = {"path": rel, "line": lineno, "bytes": len(raw_line)}
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield Record(locator, raw_line.decode("utf-8", "replace"), locator, meta, f"line {lineno}: not valid UTF-8 at byte {exc.start}")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield Record(locator, line, locator, meta, f"line {lineno}: malformed JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(cfg.text_field), str):
            yield Record(locator, line, locator, meta, f"line {lineno}: no string field '{cfg.text_field}'")
            continue
        rid = obj.get(cfg.id_field)
        extra = {k: v for k, v in obj.items() if k not in (cfg.text_field, cfg.id_field)}
        yield Record(str(rid) if rid is not None else locator, obj[cfg.text_field], locator, meta | extra)


def read_table(label: str, rel: str, table: pa.Table | pa.RecordBatch, cfg: IngestConfig, first_row: int = 0) -> Iterator[Record]:
    """Records of one table or batch whose first row is row `first_row` of the file (row numbers name the records)."""
    if cfg.text_field not in table.column_names:
        raise DataError(
            f"{rel}: no column '{cfg.text_field}' (columns: {', '.join(table.column_names)}). "
            f"Set ingest.text_field to the column that holds the text."
        )
    texts = table.column(cfg.text_field).to_pylist()
    ids = table.column(cfg.id_field).to_pylist() if cfg.id_field in table.column_names else [None] * len(texts)
    for row, (text, rid) in enumerate(zip(texts, ids, strict=True), start=first_row):
        locator = f"{label}/{rel}:{row}"
        error = None if text is None or isinstance(text, str) else f"row {row}: '{cfg.text_field}' is {type(text).__name__}, not text"
        yield Record(str(rid) if rid is not None else locator, text if isinstance(text, str) else None, locator, {"path": rel, "row": row}, error)


def read_hf_dataset(label: str, path: Path, cfg: IngestConfig) -> Iterator[Record]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    for split, ds in splits:
        rel = f"{path.name}/{split}" if split else path.name
        first = 0
        for batch in ds.data.table.to_batches(max_chunksize=READ_BATCH_ROWS):  # memory-mapped Arrow: a batch at a time
            yield from read_table(label, rel, batch, cfg, first)
            first += batch.num_rows


def read_parquet(label: str, rel: str, path: Path, cfg: IngestConfig) -> Iterator[Record]:
    """Records of a Parquet file, one row group at a time."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    first = 0
    for group in range(parquet.num_row_groups):
        table = parquet.read_row_group(group)
        yield from read_table(label, rel, table, cfg, first)
        first += table.num_rows


def iter_records(cfg: IngestConfig, stats: IngestStats, root: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    sources = resolve_sources(cfg.source, cfg.file_glob, root)
    if not sources:
        named = cfg.source or f"{stdlib_root()}/{cfg.file_glob}"
        raise DataError(f"ingest.source={named!r}: matched no files. Point ingest.source at a file, directory or glob.")

    def shown(path: Path) -> str:  # as the user named it: relative to the repository root when under it
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)

    for label, base, path in progress(sources, desc="ingest", unit="file"):
        if is_hf_dataset(path):
            stats.files_read += 1
            yield from read_hf_dataset(label, path, cfg)
            continue
        rel = path.relative_to(base).as_posix()
        streamed = path.suffix in JSONL_SUFFIXES or path.suffix in PARQUET_SUFFIXES
        try:
            size = path.stat().st_size
            # A JSONL or Parquet corpus is read as a stream, whatever its size; a text/code file is one record.
            if not streamed and size > cfg.max_file_bytes:
                stats.skipped.append({"path": shown(path), "reason": f"larger than ingest.max_file_bytes ({size} > {cfg.max_file_bytes})"})
                continue
            if path.suffix in PARQUET_SUFFIXES:
                pq.ParquetFile(path)  # the footer: a file that is not Parquet is skipped before any record
            data = b"" if streamed else path.read_bytes()
        except OSError as exc:
            stats.skipped.append({"path": shown(path), "reason": f"unreadable: {exc.strerror or exc}"})
            continue
        except pa.ArrowException as exc:
            stats.skipped.append({"path": shown(path), "reason": f"not a readable Parquet file: {exc}"})
            continue
        stats.files_read += 1
        stats.bytes_read += size
        if path.suffix in JSONL_SUFFIXES:
            yield from read_jsonl(label, base, path, cfg, stats)
        elif path.suffix in PARQUET_SUFFIXES:
            yield from read_parquet(label, rel, path, cfg)
        else:
            yield from read_text_file(label, base, path, data)


def record_row(r: Record) -> dict[str, Any]:
    """A record as a row of RECORD_SCHEMA."""
    return {"id": r.id, "text": r.text, "source": r.source, "meta": json.dumps(r.meta, sort_keys=True, default=str), "ingest_error": r.ingest_error}


def failure_listing(raw_dir: Path) -> Path:
    """Where a failed ingest lists the files it skipped (the stage's own output is never left half-written)."""
    return Path(raw_dir).with_name(f"{Path(raw_dir).name}-{SKIPPED_FILE}")


def ingest(cfg: IngestConfig, raw_dir: Path, root: Path) -> tuple[dict[str, Any], str]:
    """Stream `cfg.source` (relative to `root`) into record shards at `raw_dir` plus `skipped.jsonl`; returns (metrics,
    summary). Memory holds one shard of records (ingest.shard_max_bytes), whatever the corpus size."""
    stats = IngestStats()
    errors = 0
    listing = failure_listing(raw_dir)
    with atomic_dir(Path(raw_dir)) as tmp:
        writer = ShardWriter(tmp, shard_max_bytes=cfg.shard_max_bytes)
        for record in iter_records(cfg, stats, root):
            writer.add(record_row(record))
            errors += record.ingest_error is not None
        skipped_lines = "".join(json.dumps(s) + "\n" for s in stats.skipped)
        if not writer.rows:
            atomic_write_bytes(listing, skipped_lines.encode())
            reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in stats.skipped[:3])
            more = f" (and {len(stats.skipped) - 3} more)" if len(stats.skipped) > 3 else ""
            raise DataError(
                f"ingest.source={cfg.source!r}: {stats.files_read} file(s) read but no records in them "
                f"({len(stats.skipped)} skipped{': ' + reasons + more if reasons else ''}). Nothing to pass downstream."
                + (f" Every skipped file with its reason: {listing}" if stats.skipped else "")
            )
        shards = writer.close()
        atomic_write_bytes(tmp / SKIPPED_FILE, skipped_lines.encode())
    listing.unlink(missing_ok=True)
    reasons = Counter(s["reason"].split(":")[0].split(" (")[0] for s in stats.skipped)
    metrics = {
        "docs": writer.rows,
        "bytes": writer.text_bytes,
        "files_read": stats.files_read,
        "bytes_read": stats.bytes_read,
        "files_skipped": len(stats.skipped),
        "skipped_by_reason": dict(reasons),
        "records_with_ingest_error": errors,
        "blank_lines": stats.blank_lines,
        "shards": len(shards),
    }
    summary = (
        f"ingest: {stats.files_read} files ({stats.bytes_read / 1e6:.1f} MB) -> {writer.rows} records in "
        f"{len(shards)} shard(s) at {raw_dir}; {len(stats.skipped)} file(s) skipped, "
        f"{errors} record(s) flagged for quarantine"
    )
    return metrics, summary

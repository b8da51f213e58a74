"""Readers for every source ingest takes (stdlib .py files, directory glob, JSONL, Parquet, HF dataset) and `ingest`,
which writes them as record shards (the ingest stage's data/raw/, the monitor's staged batches).

Every file read becomes records; a record ingest cannot decode or parse keeps its raw text
and an `ingest_error`, so `validate` quarantines it with the reason (nothing is dropped
silently). Files that cannot be read at all are listed in `skipped.jsonl` with the reason.

`ingest` cuts the sources into splits of about ingest.split_bytes (byte ranges of a JSONL file, row-group ranges
of a Parquet file, runs of small files) planned from the sources and params alone, and reads the splits as engine
jobs (llmops.data.engine: local processes or Ray), each into its own shards; the shards are numbered in split
order, so the output is the same whatever the engine or the number of workers.
"""

from __future__ import annotations

import glob
import io
import json
import sysconfig
import tokenize as py_tokenize
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from llmops.common.errors import DataError
from llmops.common.io import ShardWriter, atomic_dir, atomic_write_bytes
from llmops.data.engine import map_jobs
from llmops.params.ingest import IngestConfig

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
SKIPPED_FILE = "skipped.jsonl"
READ_BATCH_ROWS = 10_000  # rows of an HF dataset taken at a time
COUNT_CHUNK_BYTES = 8 << 20  # bytes of a JSONL file read at a time when counting its newlines


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


def _lines(path: Path, start: int = 0, end: int | None = None, newlines_before: int = 0) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline) of the lines of `path` whose first byte lies in [start, end), read as a
    stream. end=None reads to the end of the file, which then, like bytes.split(b"\\n"), ends with one empty line if it
    ends in a newline (or is empty). A line belongs to the range its first byte lies in, so ranges that tile the file
    read each line once; `newlines_before` (the b"\\n" in bytes [0, start)) numbers the lines."""
    lineno, pos = newlines_before + 1, start
    ended_with_newline = True
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":  # `start` is inside a line that began in the range before: skip its rest
                rest = f.readline()
                pos += len(rest)
                if not rest.endswith(b"\n"):
                    return
                lineno += 1
        for line in f:
            if end is not None and pos >= end:
                return
            pos += len(line)
            ended_with_newline = line.endswith(b"\n")
            yield lineno, line[:-1] if ended_with_newline else line
            lineno += 1
    if end is None and ended_with_newline:
        yield lineno, b""


def count_newlines(path: Path, start: int, end: int) -> int:
    """The b"\\n" bytes in [start, end) of `path`, read a chunk at a time."""
    count = 0
    with open(path, "rb") as f:
        f.seek(start)
        while start < end:
            chunk = f.read(min(COUNT_CHUNK_BYTES, end - start))
            if not chunk:
                break
            count += chunk.count(b"\n")
            start += len(chunk)
    return count


def read_jsonl(
    label: str, root: Path, path: Path, cfg: IngestConfig, stats: IngestStats, start: int = 0, end: int | None = None, newlines_before: int = 0
) -> Iterator[Record]:
    """One record per line of bytes [start, end) of the file (see _lines), streamed: memory holds one line, whatever
    the file's size."""
    rel = path.relative_to(root).as_posix()
    for lineno, raw_line in _lines(path, start, end, newlines_before):
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


def check_text_column(rel: str, column_names: list[str], cfg: IngestConfig) -> None:
    if cfg.text_field not in column_names:
        raise DataError(
            f"{rel}: no column '{cfg.text_field}' (columns: {', '.join(column_names)}). "
            f"Set ingest.text_field to the column that holds the text."
        )


def read_table(label: str, rel: str, table: pa.Table | pa.RecordBatch, cfg: IngestConfig, first_row: int = 0) -> Iterator[Record]:
    """Records of one table or batch whose first row is row `first_row` of the file (row numbers name the records)."""
    check_text_column(rel, table.column_names, cfg)
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


def read_parquet(label: str, rel: str, path: Path, cfg: IngestConfig, groups: range | None = None, first_row: int = 0) -> Iterator[Record]:
    """Records of row groups `groups` (None: all) of a Parquet file, one row group at a time; `first_row` is the row
    number of the first group's first row."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    first = first_row
    for group in range(parquet.num_row_groups) if groups is None else groups:
        table = parquet.read_row_group(group)
        yield from read_table(label, rel, table, cfg, first)
        first += table.num_rows


# The pieces a split is made of, each a part of one source in source order. `read` yields the piece's records and
# counts into `stats` what the single-stream reader counted for it: a file is counted read by its first piece.


@dataclass(frozen=True)
class SkippedFile:
    """A file planning found unreadable or too large: listed in skipped.jsonl in its place in the source order."""

    path: str
    reason: str
    nbytes: int = 0

    def read(self, cfg: IngestConfig, stats: IngestStats) -> Iterator[Record]:
        stats.skipped.append({"path": self.path, "reason": self.reason})
        return iter(())


@dataclass(frozen=True)
class TextFile:
    """A text/code file: one record."""

    label: str
    base: Path
    path: Path
    shown: str  # the path as skipped.jsonl names it
    nbytes: int

    def read(self, cfg: IngestConfig, stats: IngestStats) -> Iterator[Record]:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            stats.skipped.append({"path": self.shown, "reason": f"unreadable: {exc.strerror or exc}"})
            return
        stats.files_read += 1
        stats.bytes_read += self.nbytes
        yield from read_text_file(self.label, self.base, self.path, data)


@dataclass(frozen=True)
class JsonlRange:
    """The lines of a JSONL file that begin in bytes [start, end) (end=None: to the end of the file)."""

    label: str
    base: Path
    path: Path
    file_bytes: int
    start: int
    end: int | None
    newlines_before: int = 0  # newlines in bytes [0, start): set by the counting pass, numbers the lines

    @property
    def nbytes(self) -> int:
        return (self.file_bytes if self.end is None else self.end) - self.start

    def read(self, cfg: IngestConfig, stats: IngestStats) -> Iterator[Record]:
        if self.start == 0:
            stats.files_read += 1
            stats.bytes_read += self.file_bytes
        return read_jsonl(self.label, self.base, self.path, cfg, stats, self.start, self.end, self.newlines_before)


@dataclass(frozen=True)
class ParquetRows:
    """Row groups `groups` of a Parquet file, whose first row is row `first_row` of the file."""

    label: str
    rel: str
    path: Path
    file_bytes: int
    groups: range
    first_row: int
    nbytes: int  # uncompressed bytes of the row groups

    def read(self, cfg: IngestConfig, stats: IngestStats) -> Iterator[Record]:
        if self.groups.start == 0:
            stats.files_read += 1
            stats.bytes_read += self.file_bytes
        return read_parquet(self.label, self.rel, self.path, cfg, self.groups, self.first_row)


@dataclass(frozen=True)
class HfDataset:
    """A saved HF dataset directory, read whole by one split."""

    label: str
    path: Path
    nbytes: int  # its Arrow files

    def read(self, cfg: IngestConfig, stats: IngestStats) -> Iterator[Record]:
        stats.files_read += 1
        return read_hf_dataset(self.label, self.path, cfg)


Piece = SkippedFile | TextFile | JsonlRange | ParquetRows | HfDataset


def runs_of(sizes: list[int], limit: int) -> list[range]:
    """Consecutive runs of items of about `limit` in total: a run ends before the item that would take it past
    `limit`, so an item of `limit` or more is a run of its own."""
    runs: list[range] = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            runs.append(range(start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        runs.append(range(start, len(sizes)))
    return runs


def plan_source(label: str, base: Path, path: Path, shown: str, cfg: IngestConfig) -> list[Piece]:
    """The pieces of one source, from its size and (Parquet) footer; the skipped entry of a file that cannot be read."""
    import pyarrow.parquet as pq

    if is_hf_dataset(path):
        return [HfDataset(label, path, sum(f.stat().st_size for f in path.rglob("*.arrow")))]
    streamed = path.suffix in JSONL_SUFFIXES or path.suffix in PARQUET_SUFFIXES
    try:
        size = path.stat().st_size
        # A JSONL or Parquet corpus is read as a stream, whatever its size; a text/code file is one record.
        if not streamed and size > cfg.max_file_bytes:
            return [SkippedFile(shown, f"larger than ingest.max_file_bytes ({size} > {cfg.max_file_bytes})")]
        if path.suffix in JSONL_SUFFIXES:
            open(path, "rb").close()  # a file that cannot be opened is skipped here, not failed in a job
        parquet = pq.ParquetFile(path) if path.suffix in PARQUET_SUFFIXES else None  # the footer: a file that is not Parquet is skipped before any record
    except OSError as exc:
        return [SkippedFile(shown, f"unreadable: {exc.strerror or exc}")]
    except pa.ArrowException as exc:
        return [SkippedFile(shown, f"not a readable Parquet file: {exc}")]
    if path.suffix in JSONL_SUFFIXES:  # byte ranges of split_bytes, the last to the end of the file (an empty file: one)
        starts = list(range(0, size, cfg.split_bytes)) or [0]
        return [JsonlRange(label, base, path, size, start, None if start == starts[-1] else start + cfg.split_bytes) for start in starts]
    if parquet is not None:
        rel = path.relative_to(base).as_posix()
        meta = parquet.metadata
        if meta.num_row_groups:
            check_text_column(rel, parquet.schema_arrow.names, cfg)
        group_bytes = [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
        group_rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        runs = runs_of(group_bytes, cfg.split_bytes) or [range(0)]  # a file of no row groups is still counted read
        return [ParquetRows(label, rel, path, size, run, sum(group_rows[: run.start]), sum(group_bytes[run.start : run.stop])) for run in runs]
    return [TextFile(label, base, path, shown, size)]


def number_lines(pieces: list[Piece], workers: int) -> list[Piece]:
    """The pieces with every JSONL range's `newlines_before`, from a parallel pass counting the newlines of each range
    but the last of its file (a file of one range needs none)."""
    counted = [p for p in pieces if isinstance(p, JsonlRange) and p.end is not None]
    counts = iter(map_jobs(count_newlines, [(p.path, p.start, p.end) for p in counted], workers=workers, desc="ingest: counting lines"))
    numbered: list[Piece] = []
    before = 0
    for piece in pieces:
        if isinstance(piece, JsonlRange):
            if piece.start == 0:
                before = 0
            piece = replace(piece, newlines_before=before)
            before += next(counts) if piece.end is not None else 0
        numbered.append(piece)
    return numbered


def plan_splits(cfg: IngestConfig, root: Path) -> list[list[Piece]]:
    """`cfg.source` (relative to `root`) cut into splits of about cfg.split_bytes, in source order: from the sources
    and params alone, never from the number of workers, so the shards are the same however many read them."""
    sources = resolve_sources(cfg.source, cfg.file_glob, root)
    if not sources:
        named = cfg.source or f"{stdlib_root()}/{cfg.file_glob}"
        raise DataError(f"ingest.source={named!r}: matched no files. Point ingest.source at a file, directory or glob.")

    def shown(path: Path) -> str:  # as the user named it: relative to the repository root when under it
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)

    pieces = [piece for label, base, path in sources for piece in plan_source(label, base, path, shown(path), cfg)]
    pieces = number_lines(pieces, cfg.workers)
    return [pieces[run.start : run.stop] for run in runs_of([p.nbytes for p in pieces], cfg.split_bytes)]


@dataclass
class SplitResult:
    shards: list[Path]
    rows: int
    text_bytes: int
    errors: int  # records with an ingest_error
    stats: IngestStats


def ingest_split(pieces: list[Piece], cfg: IngestConfig, out_dir: Path) -> SplitResult:
    """Read one split's pieces, in order, into shards at `out_dir` (none when it has no records). An engine job:
    memory holds one shard (cfg.shard_max_bytes) plus one line or row group."""
    stats = IngestStats()
    writer = ShardWriter(out_dir, shard_max_bytes=cfg.shard_max_bytes)
    errors = 0
    for piece in pieces:
        for record in piece.read(cfg, stats):
            writer.add(record_row(record))
            errors += record.ingest_error is not None
    shards = writer.close() if writer.rows else []
    return SplitResult(shards, writer.rows, writer.text_bytes, errors, stats)


def record_row(r: Record) -> dict[str, Any]:
    """A record as a row of RECORD_SCHEMA."""
    return {"id": r.id, "text": r.text, "source": r.source, "meta": json.dumps(r.meta, sort_keys=True, default=str), "ingest_error": r.ingest_error}


def failure_listing(raw_dir: Path) -> Path:
    """Where a failed ingest lists the files it skipped (the stage's own output is never left half-written)."""
    return Path(raw_dir).with_name(f"{Path(raw_dir).name}-{SKIPPED_FILE}")


def ingest(cfg: IngestConfig, raw_dir: Path, root: Path) -> tuple[dict[str, Any], str]:
    """Read `cfg.source` (relative to `root`) into record shards at `raw_dir` plus `skipped.jsonl`; returns (metrics,
    summary). The splits are engine jobs (cfg.workers at once), each writing its shards into its own folder of the
    temp dir; they are renamed part-00000.parquet, ... in split order. Memory per process holds one shard
    (ingest.shard_max_bytes), whatever the corpus size."""
    listing = failure_listing(raw_dir)
    with atomic_dir(Path(raw_dir)) as tmp:
        splits = plan_splits(cfg, root)
        jobs = [(pieces, cfg, tmp / f"split-{k:05d}") for k, pieces in enumerate(splits)]
        results: list[SplitResult] = map_jobs(ingest_split, jobs, workers=cfg.workers, desc="ingest")
        stats = IngestStats()
        for result in results:
            stats.files_read += result.stats.files_read
            stats.bytes_read += result.stats.bytes_read
            stats.blank_lines += result.stats.blank_lines
            stats.skipped += result.stats.skipped
        rows = sum(r.rows for r in results)
        text_bytes = sum(r.text_bytes for r in results)
        errors = sum(r.errors for r in results)
        skipped_lines = "".join(json.dumps(s) + "\n" for s in stats.skipped)
        if not rows:
            atomic_write_bytes(listing, skipped_lines.encode())
            reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in stats.skipped[:3])
            more = f" (and {len(stats.skipped) - 3} more)" if len(stats.skipped) > 3 else ""
            raise DataError(
                f"ingest.source={cfg.source!r}: {stats.files_read} file(s) read but no records in them "
                f"({len(stats.skipped)} skipped{': ' + reasons + more if reasons else ''}). Nothing to pass downstream."
                + (f" Every skipped file with its reason: {listing}" if stats.skipped else "")
            )
        shards = [shard for result in results for shard in result.shards]
        for number, shard in enumerate(shards):
            shard.rename(tmp / f"part-{number:05d}.parquet")
        for _, _, split_dir in jobs:
            split_dir.rmdir()
        atomic_write_bytes(tmp / SKIPPED_FILE, skipped_lines.encode())
    listing.unlink(missing_ok=True)
    reasons = Counter(s["reason"].split(":")[0].split(" (")[0] for s in stats.skipped)
    metrics = {
        "docs": rows,
        "bytes": text_bytes,
        "files_read": stats.files_read,
        "bytes_read": stats.bytes_read,
        "files_skipped": len(stats.skipped),
        "skipped_by_reason": dict(reasons),
        "records_with_ingest_error": errors,
        "blank_lines": stats.blank_lines,
        "shards": len(shards),
        "splits": len(splits),
    }
    summary = (
        f"ingest: {stats.files_read} files ({stats.bytes_read / 1e6:.1f} MB) in {len(splits)} split(s) -> {rows} records in "
        f"{len(shards)} shard(s) at {raw_dir}; {len(stats.skipped)} file(s) skipped, "
        f"{errors} record(s) flagged for quarantine"
    )
    return metrics, summary

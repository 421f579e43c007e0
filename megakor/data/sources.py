"""Reading raw corpora: JSONL / JSON, parquet, plain text, `datasets.save_to_disk` directories,
directories and globs of those, `.gz` and `.zst` compression.

Input is cut into *pieces* (a byte range of an uncompressed file, a run of parquet row groups, a row
range of a saved dataset, or a whole compressed file) so that worker processes can share one big file.
Reading a piece yields `Record`s: a document's text, or the reason it cannot be one (malformed JSON,
invalid UTF-8, missing field, ...), always with its file and the line (JSONL/text), row (parquet,
saved datasets) or item (JSON array) it came from. Nothing is dropped without a Record saying why.

JSONL and text are read line by line here rather than with `datasets.load_dataset("json")`: its
reader fails a whole file on one malformed line, and we must count that line and keep the rest.
Parquet is read with pyarrow (the library `datasets` reads it with) one row group at a time, so a
big file splits across workers; saved datasets go through `datasets.load_from_disk`.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt", ".text")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
TEXT_UNITS = ("blank_line", "line", "file")


@dataclass
class Record:
    """One document (`text` set) or one thing that could not become a document (`reason` set)."""

    text: str | None
    line: int  # 1-based line (JSONL, text), row (parquet, saved dataset) or item (JSON array) in `file`
    reason: str | None = None
    detail: str = ""


@dataclass
class Piece:
    """A unit of reading work. `start`/`end` are byte offsets for uncompressed JSONL/text, row indices
    for parquet (`row_groups` names the groups) and saved datasets, and unused (0, -1) otherwise."""

    path: str
    kind: str  # "jsonl", "text", "parquet", "hf_disk"
    compression: str | None
    start: int
    end: int
    size: int  # bytes, for balancing work and progress
    first_line: int = 1  # line/row number of the piece's first record, when known up front
    row_groups: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["row_groups"] = list(self.row_groups)
        return d

    @staticmethod
    def from_dict(d: dict) -> "Piece":
        return Piece(**{**d, "row_groups": tuple(d.get("row_groups", ()))})


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """True for a directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    p = Path(path)
    return p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())


def file_kind(path: str) -> tuple[str, str | None] | None:
    """(kind, compression) of a supported input file, or None when the suffix is not one we read."""
    name = path.lower()
    compression = None
    for suffix, comp in COMPRESSION_SUFFIXES.items():
        if name.endswith(suffix):
            compression, name = comp, name[: -len(suffix)]
            break
    if name.endswith(JSON_SUFFIXES):
        return "jsonl", compression
    if name.endswith(TEXT_SUFFIXES):
        return "text", compression
    if name.endswith(".parquet") and compression is None:
        return "parquet", None
    return None


def expand_inputs(paths: list[str] | str) -> tuple[list[str], list[str]]:
    """Expand files, directories (recursively, sorted) and globs into (inputs, unsupported files).
    A saved dataset directory is one input. A path matching nothing is an error, not an empty source."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [str(paths)]
    inputs: list[str] = []
    unsupported: list[str] = []

    def add(p: str) -> None:
        if is_saved_dataset(p):
            inputs.append(p)
        elif os.path.isdir(p):
            for child in sorted(os.listdir(p)):
                add(os.path.join(p, child))
        elif file_kind(p) is not None:
            inputs.append(p)
        else:
            unsupported.append(p)

    for raw in paths:
        raw = str(raw)
        matches = sorted(glob.glob(raw, recursive=True)) if any(c in raw for c in "*?[") else [raw]
        matches = [m for m in matches if os.path.exists(m)]
        if not matches:
            raise FileNotFoundError(f"input {raw} matches no file or directory; check the path (globs need quotes in a shell)")
        for m in matches:
            add(m)
    seen: set[str] = set()
    unique = [p for p in inputs if not (p in seen or seen.add(p))]
    return unique, unsupported


# ---------------------------------------------------------------------------------------------
# Planning: cut inputs into pieces of about `piece_bytes`.


def plan_pieces(inputs: list[str], piece_bytes: int, text_unit: str = "blank_line", split: str = "train") -> list[Piece]:
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"text_unit={text_unit!r} is not one of {TEXT_UNITS}; pick one")
    pieces: list[Piece] = []
    for path in inputs:
        if is_saved_dataset(path):
            pieces.extend(_plan_saved_dataset(path, piece_bytes, split))
            continue
        kind, compression = file_kind(path)
        size = os.path.getsize(path)
        if kind == "parquet":
            pieces.extend(_plan_parquet(path, piece_bytes, size))
        elif compression is not None or (kind == "text" and text_unit == "file") or size <= piece_bytes or _is_json_array(path, compression):
            pieces.append(Piece(path, kind, compression, 0, -1, size))
        else:
            splitter = _next_blank_line_end if (kind == "text" and text_unit == "blank_line") else _next_line_end
            bounds = [0]
            with open(path, "rb") as f:
                while bounds[-1] + piece_bytes < size:
                    nxt = splitter(f, bounds[-1] + piece_bytes)
                    if nxt >= size:
                        break
                    bounds.append(nxt)
            bounds.append(size)
            for a, b in zip(bounds[:-1], bounds[1:]):
                # first_line is fixed up after reading (pieces count their own lines); 0 marks "unknown".
                pieces.append(Piece(path, kind, None, a, b, b - a, first_line=1 if a == 0 else 0))
    return pieces


def _next_line_end(f, pos: int) -> int:
    f.seek(pos - 1)  # a cut right after a newline is already a line boundary
    f.readline()
    return f.tell()


def _next_blank_line_end(f, pos: int) -> int:
    f.seek(pos)
    f.readline()
    while True:
        line = f.readline()
        if not line or not line.strip():
            return f.tell()


def _is_json_array(path: str, compression: str | None) -> bool:
    try:
        with _open_binary(path, compression) as f:
            head = f.read(4096).lstrip()
    except Exception:  # noqa: BLE001 - a damaged file is read line by line, where the damage is counted
        return False
    return head[:1] == b"["


def _plan_parquet(path: str, piece_bytes: int, size: int) -> list[Piece]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    total_rows = max(meta.num_rows, 1)
    pieces, groups, row, start_row, acc = [], [], 0, 0, 0
    for g in range(meta.num_row_groups):
        groups.append(g)
        row += meta.row_group(g).num_rows
        acc += size * meta.row_group(g).num_rows // total_rows
        if acc >= piece_bytes or g == meta.num_row_groups - 1:
            pieces.append(Piece(path, "parquet", None, start_row, row, max(acc, 1), start_row + 1, tuple(groups)))
            groups, start_row, acc = [], row, 0
    return pieces or [Piece(path, "parquet", None, 0, 0, 1, 1, ())]


def _saved_dataset(path: str, split: str):
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ValueError(f"saved dataset {path} has splits {list(ds)} but not {split!r}; set split to one of them")
        ds = ds[split]
    return ds


def _plan_saved_dataset(path: str, piece_bytes: int, split: str) -> list[Piece]:
    ds = _saved_dataset(path, split)
    n = len(ds)
    nbytes = max(int(ds.data.nbytes), 1)
    rows_per_piece = max(1, int(n * piece_bytes / nbytes)) if n else 1
    return [
        Piece(path, "hf_disk", None, a, min(a + rows_per_piece, n), max(1, nbytes * (min(a + rows_per_piece, n) - a) // max(n, 1)), a + 1)
        for a in range(0, max(n, 1), rows_per_piece)
    ]


def line_offsets(pieces: list[Piece], piece_lines: dict[int, int]) -> list[int]:
    """What to add to each piece's line numbers to make them absolute: byte-range pieces number
    their lines from 1, so add the lines (`piece_lines[j]`, from `read_piece`'s counter) of the
    file's earlier pieces. Other pieces know their first line already and get 0."""
    offsets, running = [0] * len(pieces), {}
    for j, p in enumerate(pieces):
        if p.first_line == 0:
            offsets[j] = running.get(p.path, 0)
        elif p.kind in ("jsonl", "text"):
            running[p.path] = 0
        running[p.path] = running.get(p.path, 0) + piece_lines.get(j, 0)
    return offsets


# ---------------------------------------------------------------------------------------------
# Reading


def _open_binary(path: str, compression: str | None):
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "zstd":
        import zstandard

        # Streams written without a content size (most zstd CLI pipes) need the streaming reader.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True), 1 << 20)
    return open(path, "rb")


def read_piece(piece: Piece, text_field: str = "text", text_unit: str = "blank_line", max_bytes: int = 8 << 20,
               split: str = "train", counter: dict | None = None) -> Iterator[Record]:
    """Yield the Records of one piece. When `piece.first_line == 0` (a byte range whose first line
    number is not known without reading the file up to it), line numbers are relative to the piece
    and the caller adds the lines of the earlier pieces of the file, which `counter["lines"]` reports
    once the generator is exhausted."""
    if piece.kind == "parquet":
        yield from _read_parquet(piece, text_field, max_bytes)
    elif piece.kind == "hf_disk":
        yield from _read_saved(piece, text_field, max_bytes, split)
    elif piece.kind == "jsonl":
        yield from _read_json(piece, text_field, max_bytes, counter)
    else:
        yield from _read_text(piece, text_unit, max_bytes, counter)


def _lines(piece: Piece, counter: dict | None = None) -> Iterator[tuple[int, bytes | None, str]]:
    """(line number, raw bytes, "") per line of the piece; a read failure ends the piece with
    (line, None, reason) so the lines before it still count."""
    base = max(piece.first_line, 1)
    number = base - 1
    try:
        with _open_binary(piece.path, piece.compression) as f:
            if piece.start:
                f.seek(piece.start)
            remaining = piece.end - piece.start if piece.end >= 0 else -1
            for raw in f:
                number += 1
                yield number, raw, ""
                if remaining >= 0:
                    remaining -= len(raw)
                    if remaining <= 0:
                        break
        if counter is not None:
            counter["lines"] = number - base + 1
    except EOFError as e:  # gzip: "Compressed file ended before the end-of-stream marker was reached"
        yield number + 1, None, f"truncated_file:{e}"
    except Exception as e:  # noqa: BLE001 - a corrupt archive (bad CRC, zstd frame error) must not end the run
        yield number + 1, None, f"corrupt_file:{type(e).__name__}: {e}"


def _problem(line: int, tag: str) -> Record:
    reason, _, detail = tag.partition(":")
    return Record(None, line, reason, detail.strip())


def _text_of(obj, text_field: str | None, line: int) -> Record:
    if not isinstance(obj, dict):
        return Record(None, line, "malformed_json", f"expected a JSON object, got {type(obj).__name__}")
    if text_field is None:  # task data: the whole record, which megakor.data.chat reads
        return Record(json.dumps(obj, ensure_ascii=False), line)
    value = obj.get(text_field)
    if value is None:
        return Record(None, line, "missing_field", f"no {text_field!r} field (keys: {sorted(obj)[:8]})")
    if not isinstance(value, str):
        return Record(None, line, "not_text", f"{text_field!r} is a {type(value).__name__}, not a string")
    if not value.strip():
        return Record(None, line, "empty")
    return Record(value, line)


def _read_json(piece: Piece, text_field: str, max_bytes: int, counter: dict | None = None) -> Iterator[Record]:
    if piece.end < 0 and _is_json_array(piece.path, piece.compression):
        yield from _read_json_array(piece, text_field, max_bytes)
        return
    for number, raw, problem in _lines(piece, counter):
        if raw is None:
            yield _problem(number, problem)
            return
        if len(raw) > max_bytes:
            yield Record(None, number, "too_long", f"{len(raw)} bytes > max_document_bytes={max_bytes}")
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Record(None, number, "invalid_utf8", str(e))
            continue
        if not line.strip():
            yield Record(None, number, "empty", "blank line")
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            yield Record(None, number, "malformed_json", str(e))
            continue
        yield _text_of(obj, text_field, number)


def _read_json_array(piece: Piece, text_field: str, max_bytes: int) -> Iterator[Record]:
    try:
        with _open_binary(piece.path, piece.compression) as f:
            data = f.read()
    except EOFError as e:
        yield Record(None, 1, "truncated_file", str(e))
        return
    except Exception as e:  # noqa: BLE001
        yield Record(None, 1, "corrupt_file", f"{type(e).__name__}: {e}")
        return
    try:
        items = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        yield Record(None, 1, "invalid_utf8", f"{e}; the whole JSON array is unreadable, convert it to JSONL")
        return
    except ValueError as e:
        yield Record(None, getattr(e, "lineno", 1), "malformed_json", f"{e}; the whole JSON array is unreadable, convert it to JSONL")
        return
    for i, obj in enumerate(items if isinstance(items, list) else [items], start=1):
        rec = _text_of(obj, text_field, i)
        if rec.text is not None and len(rec.text) * 3 > max_bytes and len(rec.text.encode("utf-8")) > max_bytes:
            rec = Record(None, i, "too_long", f"more than max_document_bytes={max_bytes}")
        yield rec


def _read_text(piece: Piece, text_unit: str, max_bytes: int, counter: dict | None = None) -> Iterator[Record]:
    if text_unit == "file":
        if piece.compression is None and piece.size > max_bytes:
            yield Record(None, 1, "too_long", f"{piece.size} bytes > max_document_bytes={max_bytes}")
            return
        chunks, total = [], 0
        for number, raw, problem in _lines(piece):
            if raw is None:
                yield _problem(number, problem)
                return
            total += len(raw)
            if total > max_bytes:
                yield Record(None, 1, "too_long", f"more than max_document_bytes={max_bytes}")
                return
            chunks.append(raw)
        yield _decoded_block(chunks, 1)
        return
    block: list[bytes] = []
    block_line = 0
    block_bytes = 0
    for number, raw, problem in _lines(piece, counter):
        if raw is None:
            if block:
                yield _decoded_block(block, block_line, block_bytes, max_bytes)
            yield _problem(number, problem)
            return
        if text_unit == "line":
            yield _decoded_block([raw], number, len(raw), max_bytes)
            continue
        if raw.strip():
            if not block:
                block_line = number
            block.append(raw)
            block_bytes += len(raw)
        elif block:
            yield _decoded_block(block, block_line, block_bytes, max_bytes)
            block, block_bytes = [], 0
    if block:
        yield _decoded_block(block, block_line, block_bytes, max_bytes)


def _decoded_block(chunks: list[bytes], line: int, nbytes: int = 0, max_bytes: int = 1 << 62) -> Record:
    if nbytes > max_bytes:
        return Record(None, line, "too_long", f"{nbytes} bytes > max_document_bytes={max_bytes}")
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as e:
        return Record(None, line, "invalid_utf8", str(e))
    if not text.strip():
        return Record(None, line, "empty")
    return Record(text, line)


def _check_column(names: list[str], text_field: str, path: str) -> None:
    if text_field not in names:
        raise ValueError(f"{path} has no column {text_field!r} (columns: {names}); set text_field to the text column")


def _rows(values, first_row: int, max_bytes: int) -> Iterator[Record]:
    for i, value in enumerate(values):
        row = first_row + i
        if value is None:
            yield Record(None, row, "missing_field", "null value")
        elif not isinstance(value, str):
            yield Record(None, row, "not_text", f"a {type(value).__name__}, not a string")
        elif not value.strip():
            yield Record(None, row, "empty")
        elif len(value) * 3 > max_bytes and len(value.encode("utf-8")) > max_bytes:
            yield Record(None, row, "too_long", f"more than max_document_bytes={max_bytes}")
        else:
            yield Record(value, row)


def _read_parquet(piece: Piece, text_field: str, max_bytes: int) -> Iterator[Record]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(piece.path)
    _check_column(pf.schema_arrow.names, text_field, piece.path)
    row = piece.start + 1
    for g in piece.row_groups:
        try:
            column = pf.read_row_group(g, columns=[text_field]).column(0)
        except Exception as e:  # noqa: BLE001 - one unreadable row group must not lose the others
            n = pf.metadata.row_group(g).num_rows
            for i in range(n):
                yield Record(None, row + i, "corrupt_file", f"row group {g}: {type(e).__name__}: {e}")
            row += n
            continue
        values = column.to_pylist()
        yield from _rows(values, row, max_bytes)
        row += len(values)


def _read_saved(piece: Piece, text_field: str, max_bytes: int, split: str) -> Iterator[Record]:
    ds = _saved_dataset(piece.path, split)
    _check_column(ds.column_names, text_field, piece.path)
    ds = ds.select_columns([text_field])
    for a in range(piece.start, piece.end, 1024):
        b = min(a + 1024, piece.end)
        yield from _rows(ds[a:b][text_field], a + 1, max_bytes)

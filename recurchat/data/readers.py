"""Readers for user text data: .txt, .jsonl (field `text`), .parquet (column `text`), or a directory of them.

Every problem with the user's files is a one-line UserError naming the file (and line, for jsonl).
Exercised by `pytest tests/data/test_corpus.py`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from recurchat.errors import UserError

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet")


def data_files(path: str | Path) -> list[Path]:
    """The data files `path` stands for: itself, or every supported file under it (sorted, recursive)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"data path not found: {path}")
    if path.is_dir():
        return shard_files(path, SUPPORTED_EXTENSIONS)
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise UserError(f"unsupported data file extension {path.suffix or '(none)'!r}: {path} "
                        f"(expected {', '.join(SUPPORTED_EXTENSIONS)} or a directory of them)")
    return [path]


def shard_files(directory: Path, suffixes: Sequence[str]) -> list[Path]:
    """Every file under `directory` (recursive, sorted) with one of `suffixes`; UserError if there is none."""
    # Hidden files/dirs are editor and VCS droppings (.git, .DS_Store), never shards.
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    if not files:
        raise UserError(f"no {'/'.join(suffixes)} files under directory {directory}")
    return files


def data_identity(path: str | Path) -> dict:
    """What the data is, cheaply (no reading): resolved path plus each file's size and mtime."""
    root = Path(path).expanduser().resolve()
    files = data_files(root)
    return {
        "path": str(root),
        "files": [
            [f.name if root.is_file() else str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns]
            for f in files
        ],
    }


def read_documents(path: str | Path) -> list[str]:
    """All non-blank documents under `path`, in sorted file order."""
    docs: list[str] = []
    for file in data_files(path):
        docs.extend(_read_file(file))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"data is empty (no text found): {path}")
    return docs


def _read_file(file: Path) -> list[str]:
    suffix = file.suffix.lower()
    if suffix == ".txt":
        return [_read_text(file)]
    if suffix == ".jsonl":
        return _read_jsonl(file)
    return _read_parquet(file)


def _read_text(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{file}: not UTF-8 text (bad byte at offset {e.start})") from e


def jsonl_records(file: Path) -> Iterator[tuple[int, object]]:
    """(line number, JSON value) for each non-blank line of a UTF-8 JSONL file; UserError names file:line."""
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines() would cut.
    for lineno, line in enumerate(_read_text(file).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{file}:{lineno}: malformed JSON line ({e.msg})") from e
        yield lineno, record


def _read_jsonl(file: Path) -> list[str]:
    docs = []
    for lineno, record in jsonl_records(file):
        if not isinstance(record, dict) or "text" not in record:
            raise UserError(f"{file}:{lineno}: missing field 'text'")
        text = record["text"]
        if not isinstance(text, str):
            raise UserError(f"{file}:{lineno}: field 'text' is {type(text).__name__}, expected a string")
        docs.append(text)
    return docs


def _read_parquet(file: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(file)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{file}: not a readable parquet file ({_first_line(e)})") from e
    if "text" not in schema.names:
        raise UserError(f"{file}: missing column 'text' (columns: {', '.join(schema.names) or 'none'})")
    field_type = schema.field("text").type
    string_types = (pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", None))
    if not any(is_type(field_type) for is_type in string_types if is_type is not None):
        raise UserError(f"{file}: column 'text' has type {field_type}, expected string")
    try:
        column = pq.read_table(file, columns=["text"]).column("text")
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{file}: not a readable parquet file ({_first_line(e)})") from e
    return [t for t in column.to_pylist() if t is not None]


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

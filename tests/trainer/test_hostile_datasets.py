"""Hostile and malformed data files: each is refused before training with the file and the
row (or line) named, and the awkward-but-valid ones (a BOM, CRLF line ends, U+2028 inside a
string) are read exactly as meant."""

# ruff: noqa: E501  (the case table reads best one case per line)
from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from kubetune.api.v1alpha1 import DatasetSpec
from kubetune_trainer.data import MAX_ROW_BYTES, load_training_data
from kubetune_trainer.errors import BadInputError

GOOD = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(1, 9)]
GOOD_LINES = "".join(json.dumps(r) + "\n" for r in GOOD)


def jsonl_with(bad_line: str, at: int = 3) -> bytes:
    """GOOD as JSON lines with `bad_line` as line `at`."""
    lines = [json.dumps(r) for r in GOOD]
    lines.insert(at - 1, bad_line)
    return ("\n".join(lines) + "\n").encode()


def chat_with(message: dict) -> bytes:
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ] * 3
    bad = {"messages": [{"role": "user", "content": "q"}, message]}
    return "".join(json.dumps(r) + "\n" for r in [*rows, bad]).encode()


# (case id, file name, contents, words the one-line error must contain)
MALFORMED: list[tuple[str, str, bytes | Callable[[], bytes], list[str]]] = [
    ("latin-1", "train.jsonl", GOOD_LINES.encode() + '{"instruction": "café", "output": "x"}\n'.encode("latin-1"), ["train.jsonl", "line 9", "not UTF-8"]),
    ("utf-16", "train.jsonl", GOOD_LINES.encode("utf-16"), ["train.jsonl", "line 1", "not UTF-8"]),
    ("giant-line", "train.jsonl", lambda: jsonl_with(json.dumps({"instruction": "x" * (MAX_ROW_BYTES + 10), "output": "y"})), ["train.jsonl", "row 3", "per row"]),
    ("nan", "train.jsonl", jsonl_with('{"instruction": "a", "output": NaN}'), ["train.jsonl", "row 3", "NaN is not valid JSON"]),
    ("infinity", "train.jsonl", jsonl_with('{"instruction": "a", "output": "b", "score": -Infinity}'), ["row 3", "-Infinity"]),
    ("nested-wrong-type", "train.jsonl", jsonl_with('{"instruction": {"text": "a"}, "output": "b"}'), ["row 3", "'instruction' must be a string, got dict"]),
    ("number-as-text", "train.jsonl", jsonl_with('{"instruction": "a", "output": 42}'), ["row 3", "'output' must be a string, got int"]),
    ("empty-string", "train.jsonl", jsonl_with('{"instruction": "a", "output": ""}'), ["row 3", "'output' is empty"]),
    ("blank-string", "train.jsonl", jsonl_with('{"instruction": "   ", "output": "b"}'), ["row 3", "'instruction' is empty"]),
    ("duplicate-keys", "train.jsonl", jsonl_with('{"instruction": "a", "output": "b", "output": "c"}'), ["row 3", "duplicate key 'output'"]),
    ("lone-surrogate", "train.jsonl", jsonl_with('{"instruction": "\\ud800", "output": "b"}'), ["row 3", "lone surrogate"]),
    ("array-row", "train.jsonl", jsonl_with('["instruction", "output"]'), ["row 3", "expected a JSON object, got list"]),
    ("truncated-json", "train.jsonl", jsonl_with('{"instruction": "a", "out'), ["row 3", "invalid JSON"]),
    ("unknown-role", "chat.jsonl", chat_with({"role": "narrator", "content": "x"}), ["chat.jsonl", "row 4", "message 2", "unknown role 'narrator'"]),
    ("image-part", "chat.jsonl", chat_with({"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}), ["chat.jsonl", "row 4", "message 2", "content part 1 is 'image_url'", "only text"]),
    ("null-content", "chat.jsonl", chat_with({"role": "assistant", "content": None}), ["row 4", "message 2", "missing field 'content'"]),
    ("late-system", "chat.jsonl", chat_with({"role": "system", "content": "be nice"}), ["row 4", "message 2", "system message must come first"]),
    ("bad-gzip", "train.jsonl.gz", b"\x1f\x8b\x08\x00garbage", ["train.jsonl.gz", "not a valid gzip file"]),
    ("bad-parquet", "train.parquet", b"PAR1 this is not parquet", ["train.parquet", "not a valid Parquet file"]),
    ("csv-surplus-cells", "train.csv", b"instruction,output\na,b\nc,d,e\n", ["train.csv", "row 2", "more cells"]),
    ("json-not-a-list", "train.json", b'"just a string"', ["train.json", "expected a JSON array of objects"]),
]  # fmt: skip


def write(tmp_path: Path, name: str, contents: bytes | Callable[[], bytes]) -> Path:
    path = tmp_path / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(contents() if callable(contents) else contents)
    return path


def load(tmp_path: Path, path: Path):  # noqa: ANN201 (TrainingData)
    spec = DatasetSpec(uri=f"file://{path}", validationSplit=0.0)
    return load_training_data(spec, seed=7, cache_dir=tmp_path / "cache")


def test_there_are_at_least_fifteen_malformed_datasets() -> None:
    assert len(MALFORMED) >= 15


@pytest.mark.parametrize(
    ("case_id", "name", "contents", "words"), MALFORMED, ids=[m[0] for m in MALFORMED]
)
def test_malformed_dataset_is_refused_naming_file_and_row(
    tmp_path: Path, case_id: str, name: str, contents: bytes, words: list[str]
) -> None:
    path = write(tmp_path, name, contents)
    with pytest.raises(BadInputError) as caught:
        load(tmp_path, path)
    message = str(caught.value)
    assert "\n" not in message and len(message) < 500, message
    for word in words:
        assert word in message, message


def test_bom_and_crlf_are_read_as_meant(tmp_path: Path) -> None:
    text = "\ufeff" + GOOD_LINES.replace("\n", "\r\n")
    data = load(tmp_path, write(tmp_path, "train.jsonl", text.encode()))
    assert data.train_rows == len(GOOD)
    # The first column is `instruction`, not `\ufeffinstruction`: the format was detected.
    assert data.format == "alpaca"


def test_line_separator_inside_a_string_does_not_split_the_row(tmp_path: Path) -> None:
    rows = [*GOOD, {"instruction": "first\u2028second\x0cthird", "output": "ok"}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    data = load(tmp_path, write(tmp_path, "train.jsonl", text.encode()))
    assert data.train_rows == len(rows)


def test_text_content_parts_are_joined(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]
    contents = chat_with({"role": "assistant", "content": parts})
    data = load(tmp_path, write(tmp_path, "chat.jsonl", contents))
    assert data.train[-1]["messages"][-1] == {"role": "assistant", "content": "Hello, world"}


def test_gzip_of_good_rows_still_loads(tmp_path: Path) -> None:
    data = load(tmp_path, write(tmp_path, "train.jsonl.gz", gzip.compress(GOOD_LINES.encode())))
    assert data.train_rows == len(GOOD)

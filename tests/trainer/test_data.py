"""Training data: format detection, row conversion, file reading, splits and bad input."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kubetune.api.v1alpha1 import DatasetSpec
from kubetune_trainer.data import (
    convert_row,
    detect_format,
    ensure_chat_template,
    load_eval_rows,
    load_training_data,
    parse_jsonl,
)
from kubetune_trainer.errors import BadInputError
from tests.fixtures.s3 import S3Server

ALPACA = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(1, 21)]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def error_of(call: Any, *args: Any, **kwargs: Any) -> str:
    with pytest.raises(BadInputError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def load(tmp_path: Path, uri: str, **spec: Any):  # noqa: ANN201 (TrainingData)
    return load_training_data(DatasetSpec(uri=uri, **spec), seed=7, cache_dir=tmp_path / "cache")


# --- detection and conversion (pure) ----------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["instruction", "input", "output"], "alpaca"),
        (["messages"], "chat"),
        (["messages", "text"], "chat"),
        (["prompt", "completion", "id"], "prompt-completion"),
        (["text", "source"], "text"),
    ],
)
def test_detect_format(columns: list[str], expected: str) -> None:
    assert detect_format(columns) == expected


def test_undetectable_format_names_the_columns() -> None:
    assert error_of(detect_format, ["question", "answer"], "qa.jsonl") == (
        "qa.jsonl: cannot detect the dataset format from columns [question, answer]: expected "
        "instruction+output (alpaca), messages (chat), prompt+completion (prompt-completion) "
        "or text (text)"
    )


@pytest.mark.parametrize(
    ("row", "fmt", "expected"),
    [
        (
            {"instruction": "Add the numbers.", "input": "2 3", "output": "5", "id": 9},
            "alpaca",
            {
                "prompt": "### Instruction:\nAdd the numbers.\n\n"
                "### Input:\n2 3\n\n### Response:\n",
                "completion": "5",
            },
        ),
        (
            {"instruction": "Greet.", "input": "", "output": "Hello"},
            "alpaca",
            {"prompt": "### Instruction:\nGreet.\n\n### Response:\n", "completion": "Hello"},
        ),
        (
            {"instruction": "Greet.", "input": None, "output": "Hi"},
            "alpaca",
            {"prompt": "### Instruction:\nGreet.\n\n### Response:\n", "completion": "Hi"},
        ),
        (
            {"prompt": "Q: 1+1?", "completion": " 2"},
            "prompt-completion",
            {"prompt": "Q: 1+1?", "completion": " 2"},
        ),
        ({"text": "Plain text.", "meta": 1}, "text", {"text": "Plain text."}),
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief.", "name": "x"},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                ]
            },
            "chat",
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello."},
                ]
            },
        ),
        (
            {
                "messages": '[{"role": "user", "content": "a"}, '
                '{"role": "assistant", "content": "b"}]'
            },
            "chat",
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        ),
    ],
)
def test_convert_row(row: dict, fmt: str, expected: dict) -> None:
    assert convert_row(row, fmt, 1, "train.jsonl") == expected


@pytest.mark.parametrize(
    ("row", "fmt", "expected"),
    [
        ({"instruction": "x"}, "alpaca", "missing field 'output' (format alpaca)"),
        (
            {"instruction": "x", "output": 5},
            "alpaca",
            "field 'output' must be a string, got int (format alpaca)",
        ),
        (
            {"instruction": " ", "output": "y"},
            "alpaca",
            "field 'instruction' is empty (format alpaca)",
        ),
        (
            {"completion": "y"},
            "prompt-completion",
            "missing field 'prompt' (format prompt-completion)",
        ),
        (
            {"prompt": "x", "completion": ""},
            "prompt-completion",
            "field 'completion' is empty (format prompt-completion)",
        ),
        ({"body": "x"}, "text", "missing field 'text' (format text)"),
        ({"text": "x"}, "chat", "missing field 'messages' (format chat)"),
        (
            {"messages": []},
            "chat",
            "field 'messages' must be a non-empty list of {role, content} objects",
        ),
        ({"messages": "[oops"}, "chat", "field 'messages' is not valid JSON (Expecting value)"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
            "chat",
            "message 2: unknown role 'bot' (expected system, user, assistant or tool)",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
            "chat",
            "message 2: a system message must come first",
        ),
        (
            {"messages": [{"from": "human", "value": "a"}]},
            "chat",
            "message 1: missing field 'role'",
        ),
        (
            {"messages": [{"role": "user", "content": ["a"]}]},
            "chat",
            "message 1: content part 1 is 'str'; only text parts are supported",
        ),
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
            "chat",
            "no assistant message with content (nothing to learn from)",
        ),
    ],
)
def test_convert_row_rejects(row: dict, fmt: str, expected: str) -> None:
    assert error_of(convert_row, row, fmt, 7, "train.jsonl") == f"train.jsonl: row 7: {expected}"


def test_jsonl_rows_are_numbered_by_line() -> None:
    rows = parse_jsonl('{"a": 1}\n\n{"a": 2}\n', "t.jsonl")
    assert rows == [(1, {"a": 1}), (3, {"a": 2})]
    assert error_of(parse_jsonl, '{"a": 1}\n{"a": 2,}\n', "t.jsonl") == (
        "t.jsonl: row 2: invalid JSON (Expecting property name enclosed in double quotes "
        "at column 9)"
    )
    assert error_of(parse_jsonl, '{"a": 1}\n[1, 2]\n', "t.jsonl") == (
        "t.jsonl: row 2: expected a JSON object, got list"
    )


# --- loading files end to end ------------------------------------------------------------


def test_alpaca_jsonl_with_seeded_split(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", ALPACA)
    data = load(tmp_path, f"file://{path}", validationSplit=0.2)
    assert data.format == "alpaca"
    assert (data.train_rows, data.validation_rows) == (16, 4)
    assert data.train.column_names == ["prompt", "completion"]
    assert data.digest == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert data.source == f"file://{path}"
    # Every row ends up on exactly one side.
    completions = sorted(
        list(data.train["completion"]) + list(data.validation["completion"]), key=int
    )
    assert completions == [r["output"] for r in ALPACA]

    same_seed = load(tmp_path, f"file://{path}", validationSplit=0.2)
    other_seed = load_training_data(
        DatasetSpec(uri=f"file://{path}", validationSplit=0.2), seed=8, cache_dir=tmp_path
    )
    assert list(same_seed.validation["completion"]) == list(data.validation["completion"])
    assert list(other_seed.validation["completion"]) != list(data.validation["completion"])


def test_no_split_means_no_validation(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", ALPACA[:3])
    data = load(tmp_path, f"file://{path}", validationSplit=0.0)
    assert data.validation is None
    assert (data.train_rows, data.validation_rows) == (3, 0)


def test_validation_uri_replaces_the_split(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ALPACA[:5])
    val = write_jsonl(tmp_path / "val.jsonl", [{"instruction": "V", "input": "in", "output": "o"}])
    data = load(tmp_path, f"file://{train}", validationUri=f"file://{val}", validationSplit=0.5)
    assert (data.train_rows, data.validation_rows) == (5, 1)
    assert data.validation[0] == {
        "prompt": "### Instruction:\nV\n\n### Input:\nin\n\n### Response:\n",
        "completion": "o",
    }
    assert data.validation_digest == "sha256:" + hashlib.sha256(val.read_bytes()).hexdigest()


def test_validation_format_must_match(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ALPACA[:5])
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "t"}])
    assert (
        error_of(load, tmp_path, f"file://{train}", validationUri=f"file://{val}")
        == "val.jsonl: validation data is text but the training data is alpaca"
    )


def test_chat_csv_json_parquet_and_gzip(tmp_path: Path) -> None:
    chat = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
        for i in range(4)
    ]
    json_path = tmp_path / "chat.json"
    json_path.write_text(json.dumps(chat))
    data = load(tmp_path, f"file://{json_path}", validationSplit=0)
    assert data.format == "chat"
    assert data.train[0]["messages"] == chat[0]["messages"]

    csv_path = tmp_path / "pc.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
        writer.writeheader()
        writer.writerows([{"prompt": "a, b", "completion": "c"}, {"prompt": "", "completion": "d"}])
    data = load(tmp_path, f"file://{csv_path}", validationSplit=0)
    assert data.format == "prompt-completion"
    assert data.train.to_list() == [
        {"prompt": "a, b", "completion": "c"},
        {"prompt": "", "completion": "d"},
    ]

    parquet_path = tmp_path / "text.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "one"}, {"text": "two"}]), parquet_path)
    data = load(tmp_path, f"file://{parquet_path}", validationSplit=0)
    assert (data.format, list(data.train["text"])) == ("text", ["one", "two"])

    gz_path = tmp_path / "text.jsonl.gz"
    gz_path.write_bytes(gzip.compress(b'{"text": "zipped"}\n'))
    data = load(tmp_path, f"file://{gz_path}", validationSplit=0)
    assert list(data.train["text"]) == ["zipped"]
    assert data.digest == "sha256:" + hashlib.sha256(gz_path.read_bytes()).hexdigest()


def test_folder_of_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_jsonl(tmp_path / "data" / "part-0.jsonl", [{"text": "a"}, {"text": "b"}])
    write_jsonl(tmp_path / "data" / "part-1.jsonl", [{"text": "c"}, {"body": "d"}])
    (tmp_path / "data" / "README.md").write_text("not data")
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path))
    message = error_of(load, tmp_path, "pvc://data", format="text")
    assert message == "part-1.jsonl: row 2: missing field 'text' (format text)"

    write_jsonl(tmp_path / "data" / "part-1.jsonl", [{"text": "c"}])
    data = load(tmp_path, "pvc://data", validationSplit=0)
    assert list(data.train["text"]) == ["a", "b", "c"]
    both = (tmp_path / "data" / "part-0.jsonl").read_bytes() + (
        tmp_path / "data" / "part-1.jsonl"
    ).read_bytes()
    assert data.digest == "sha256:" + hashlib.sha256(both).hexdigest()


def test_dataset_from_s3(s3_env: str, s3_server: S3Server, tmp_path: Path) -> None:
    body = "".join(json.dumps(r) + "\n" for r in ALPACA[:4]).encode()
    s3_server.client().put_object(Bucket=s3_env, Key="data/train.jsonl", Body=body)
    data = load(tmp_path, f"s3://{s3_env}/data/train.jsonl", validationSplit=0.25)
    assert (data.format, data.train_rows, data.validation_rows) == ("alpaca", 3, 1)
    assert data.digest == "sha256:" + hashlib.sha256(body).hexdigest()


def test_load_eval_rows_any_format(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "p", "completion": "c"}])
    assert load_eval_rows(f"file://{path}", cache_dir=tmp_path) == [
        {"prompt": "p", "completion": "c"}
    ]


# --- bad input through the whole loader --------------------------------------------------


def test_first_bad_row_is_named(tmp_path: Path) -> None:
    rows = ALPACA[:6] + [{"instruction": "no output"}] + [{"instruction": "x"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    assert error_of(load, tmp_path, f"file://{path}") == (
        "train.jsonl: row 7: missing field 'output' (format alpaca)"
    )


def test_invalid_json_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "unterminated}\n')
    assert error_of(load, tmp_path, f"file://{path}") == (
        "train.jsonl: row 2: invalid JSON (Unterminated string starting at at column 10)"
    )


def test_undetectable_dataset_names_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    assert error_of(load, tmp_path, f"file://{path}").startswith(
        "qa.jsonl: cannot detect the dataset format from columns [question, answer]:"
    )


def test_empty_dataset(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n\n")
    assert error_of(load, tmp_path, f"file://{path}") == "train.jsonl: dataset is empty (no rows)"


def test_split_leaving_no_training_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", ALPACA[:1])
    assert error_of(load, tmp_path, f"file://{path}", validationSplit=0.05) == (
        "train.jsonl: validationSplit 0.05 of 1 rows leaves no training rows "
        "(lower spec.dataset.validationSplit or add rows)"
    )


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "train.txt"
    path.write_text("hello\n")
    assert error_of(load, tmp_path, f"file://{path}") == (
        "train.txt: unsupported file extension '.txt' (expected .jsonl, .json, .csv or .parquet)"
    )


def test_missing_dataset_file(tmp_path: Path) -> None:
    assert error_of(load, tmp_path, f"file://{tmp_path}/absent.jsonl") == (
        f"file://{tmp_path}/absent.jsonl: not found ({tmp_path}/absent.jsonl does not exist)"
    )


def test_csv_with_surplus_cells(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text("text\nfine\ntoo,many\n")
    assert error_of(load, tmp_path, f"file://{path}") == (
        "train.csv: row 2: more cells than the 1 header columns"
    )


def test_hub_dataset_offline_and_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets
    import huggingface_hub

    # As if HF_HUB_OFFLINE=1 had been set when the process started (the libraries read it at
    # import), so nothing waits on network timeouts.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert error_of(load, tmp_path, "hf://kubetune-tests/absent") == (
        "dataset not found: hf://kubetune-tests/absent "
        "(not in the local cache and HF_HUB_OFFLINE is set)"
    )


# --- chat templates ----------------------------------------------------------------------

TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def tokenizer() -> Any:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hi": 1}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), unk_token="[UNK]"
    )


def test_chat_template_required(tokenizer: Any) -> None:
    assert error_of(ensure_chat_template, tokenizer, None, "hf://org/tiny") == (
        "hf://org/tiny: the tokenizer has no chat template; chat data needs one "
        "(set spec.dataset.chatTemplate)"
    )


def test_chat_template_given_is_used(tokenizer: Any) -> None:
    ensure_chat_template(tokenizer, TEMPLATE, "hf://org/tiny")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<user>hi\n<assistant>"
    ensure_chat_template(tokenizer, None, "hf://org/tiny")  # now it has one: fine
    assert tokenizer.chat_template == TEMPLATE


def test_chat_template_syntax_error(tokenizer: Any) -> None:
    assert error_of(ensure_chat_template, tokenizer, "{% for m in messages %}", "m") == (
        "spec.dataset.chatTemplate: invalid Jinja template (line 1: Unexpected end of template. "
        "Jinja was looking for the following tags: 'endfor' or 'else'. The innermost block that "
        "needs to be closed is 'for'.)"
    )

"""Training data: read it, recognise its format, check every row, convert to TRL's types.

Files: .jsonl, .json (an array of objects, or JSON Lines), .csv (header row) and .parquet,
optionally gzip-compressed (.jsonl.gz ...); a folder or S3 prefix means all data files in
it, in path order. Sources: s3://, pvc://, file:// and hf:// (datasets' `load_dataset`,
split "train").

Formats and what they become (the column names TRL's SFTTrainer expects):

- alpaca: instruction, optional input, output -> prompt, completion (ALPACA_* templates),
  so the loss is on the response only; or, with spec.dataset.promptTemplate chat (auto when
  the tokenizer has a chat template), -> messages: one user turn (instruction, a blank line,
  input) and one assistant turn (output), rendered like the model is served;
- prompt-completion: prompt, completion -> prompt, completion (plain strings);
- chat: messages = [{role: system|user|assistant|tool, content}] -> messages; tool calling:
  assistant `tool_calls` ([{id?, type?, function: {name, arguments}}], content may then be
  empty), `tool` messages (`tool_call_id`, `name` optional) and a row-level `tools` list
  (function definitions, given to the chat template); arguments and tools kept as JSON text;
- text: text -> text.

Row numbers in errors are 1-based: the line number for JSON Lines (blank lines count), the
data row after the header for CSV, the position for JSON arrays and Parquet.

Digest: "sha256:" + the SHA-256 of the raw bytes of the data files as stored (compressed
files as compressed), concatenated in path order; for one file it equals `sha256sum FILE`.
hf:// datasets have no files of ours, so their digest is the SHA-256 of the rows as
canonical JSON lines (sorted keys). The digest covers the training data; a separate
validation file has its own `validation_digest`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from datasets.exceptions import DatasetNotFoundError

from kubetune.api.contract import ENV_HF_TOKEN
from kubetune.api.v1alpha1 import DatasetSpec
from kubetune_trainer.errors import BadInputError
from kubetune_trainer.model_source import hub_offline
from kubetune_trainer.storage import SYNC_INDEX, fetch, parse_uri

FORMATS = ("alpaca", "chat", "prompt-completion", "text")
CHAT_ROLES = ("system", "user", "assistant", "tool")
# A chat row's tool definitions, passed to the chat template; kept as JSON text because
# Arrow would merge differently shaped JSON schemas across rows into one padded struct.
TOOLS_FIELD = "tools"
EXTENSIONS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
EXTENSION_LIST = ".jsonl, .json, .csv or .parquet"

# The prompt an alpaca row becomes; the model learns to write `output` after it.
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# What each format needs; detection tries them in this order (chat first: a chat row may
# also carry a stray `text` column).
REQUIRED_FIELDS = {
    "chat": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}


@dataclass
class RawRows:
    """Rows as read, before conversion. `refs[i]` names row i: (file name, row number)."""

    rows: list[dict[str, Any]]
    refs: list[tuple[str, int]]
    name: str  # the file name, or the URI for a folder, prefix or hub dataset
    digest: str

    @property
    def columns(self) -> list[str]:
        return column_names(self.rows)


@dataclass
class TrainingData:
    """Converted training (and validation) data, ready for TRL."""

    train: datasets.Dataset
    validation: datasets.Dataset | None
    format: str
    digest: str
    train_rows: int
    validation_rows: int
    source: str
    validation_source: str | None = None
    validation_digest: str | None = None
    # "<file>: row <n>" of each row, in dataset order (named when a row is excluded).
    train_refs: list[str] = field(default_factory=list)
    validation_refs: list[str] = field(default_factory=list)
    prompt_template: str | None = None  # alpaca rows: "alpaca" or "chat"


# --- pure functions: format detection and row conversion --------------------------------


def column_names(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Every key seen in `rows`, in order of first appearance."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def detect_format(columns: Iterable[str], source: str = "dataset") -> str:
    """The row format the columns point to; BadInputError naming the columns otherwise."""
    present = set(columns)
    for fmt, required in REQUIRED_FIELDS.items():
        if present.issuperset(required):
            return fmt
    seen = ", ".join(columns) if present else "none"
    raise BadInputError(
        f"{source}: cannot detect the dataset format from columns [{seen}]: expected "
        "instruction+output (alpaca), messages (chat), prompt+completion (prompt-completion) "
        "or text (text)"
    )


def _text_field(
    row: dict[str, Any], name: str, fmt: str, where: str, *, required: bool = True
) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise BadInputError(f"{where}: missing field {name!r} (format {fmt})")
        return ""
    if not isinstance(value, str):
        raise BadInputError(
            f"{where}: field {name!r} must be a string, got {type(value).__name__} (format {fmt})"
        )
    if required and not value.strip():
        raise BadInputError(f"{where}: field {name!r} is empty (format {fmt})")
    return value


def _text_of_parts(parts: list[Any], at: str) -> str:
    """The text of `[{"type": "text", "text": ...}, ...]`; other parts (images, audio) are
    refused: the trainer fine-tunes text models."""
    texts = []
    for number, part in enumerate(parts, start=1):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise BadInputError(
                f"{at}: content part {number} is {kind!r}; only text parts are supported"
            )
        texts.append(part["text"])
    return "".join(texts)


def _tool_calls(value: Any, at: str) -> list[dict[str, Any]]:
    """An assistant message's tool calls, arguments as JSON text (see TOOLS_FIELD)."""
    if not isinstance(value, list) or not value:
        raise BadInputError(f"{at}: field 'tool_calls' must be a non-empty list of objects")
    calls = []
    for number, call in enumerate(value, start=1):
        where = f"{at}: tool call {number}"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadInputError(f"{where}: expected {{function: {{name, arguments}}}}")
        arguments = function.get("arguments", {})
        if not isinstance(arguments, (str, dict)):
            raise BadInputError(f"{where}: 'arguments' must be an object or JSON text")
        calls.append(
            {
                "id": str(call["id"]) if call.get("id") is not None else None,
                "type": call.get("type") or "function",
                "function": {
                    "name": function["name"],
                    "arguments": arguments
                    if isinstance(arguments, str)
                    else json.dumps(arguments, ensure_ascii=False),
                },
            }
        )
    return calls


def _tools(row: dict[str, Any], where: str) -> str | None:
    tools = row.get(TOOLS_FIELD)
    if tools is None:
        return None
    if isinstance(tools, str):  # CSV cells hold the list as JSON text
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            raise BadInputError(f"{where}: field 'tools' is not valid JSON ({error.msg})") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise BadInputError(f"{where}: field 'tools' must be a list of function definitions")
    return json.dumps(tools, ensure_ascii=False)


def _messages(row: dict[str, Any], where: str) -> list[dict[str, Any]]:
    messages = row.get("messages")
    if messages is None:
        raise BadInputError(f"{where}: missing field 'messages' (format chat)")
    if isinstance(messages, str):  # CSV cells hold the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as error:
            raise BadInputError(
                f"{where}: field 'messages' is not valid JSON ({error.msg})"
            ) from None
    if not isinstance(messages, list) or not messages:
        raise BadInputError(
            f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects"
        )
    converted = []
    for index, message in enumerate(messages, start=1):
        at = f"{where}: message {index}"
        if not isinstance(message, dict):
            raise BadInputError(f"{at}: expected an object with role and content")
        role = message.get("role")
        if role is None:
            raise BadInputError(f"{at}: missing field 'role'")
        if role not in CHAT_ROLES:
            raise BadInputError(
                f"{at}: unknown role {role!r} (expected system, user, assistant or tool)"
            )
        if role == "system" and index != 1:
            raise BadInputError(f"{at}: a system message must come first")
        content = message.get("content")
        calls = message.get("tool_calls") if role == "assistant" else None
        if content is None and calls:
            content = ""  # a turn that only calls tools
        if content is None:
            raise BadInputError(f"{at}: missing field 'content'")
        if isinstance(content, list):  # OpenAI-style content parts: text parts only
            content = _text_of_parts(content, at)
        if not isinstance(content, str):
            raise BadInputError(
                f"{at}: field 'content' must be a string, got {type(content).__name__}"
            )
        entry: dict[str, Any] = {"role": role, "content": content}
        if calls:
            entry["tool_calls"] = _tool_calls(calls, at)
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if message.get(key) is not None:
                    entry[key] = str(message[key])
        converted.append(entry)
    if not any(
        m["role"] == "assistant" and (m["content"].strip() or m.get("tool_calls"))
        for m in converted
    ):
        raise BadInputError(f"{where}: no assistant message with content (nothing to learn from)")
    return converted


def alpaca_prompt(instruction: str, input_text: str) -> str:
    if input_text.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


def alpaca_messages(instruction: str, input_text: str, output: str) -> list[dict[str, str]]:
    """An alpaca row as a conversation: one user turn, one assistant turn."""
    user = f"{instruction}\n\n{input_text}" if input_text.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def resolve_prompt_template(choice: str, tokenizer: Any, source: str) -> str:
    """alpaca | chat for spec.dataset.promptTemplate (auto: chat when the tokenizer has a
    chat template)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if choice == "auto":
        return "chat" if has_template else "alpaca"
    if choice == "chat" and not has_template:
        raise BadInputError(
            f"spec.dataset.promptTemplate chat: {source} has no chat template "
            "(set spec.dataset.chatTemplate, or promptTemplate alpaca)"
        )
    return choice


def convert_row(
    row: dict[str, Any], fmt: str, row_number: int, source: str, *, alpaca_as_chat: bool = False
) -> dict[str, Any]:
    """One row in TRL's form for `fmt`; BadInputError naming `source`, the row and the field."""
    where = f"{source}: row {row_number}"
    if fmt == "alpaca":
        instruction = _text_field(row, "instruction", fmt, where)
        input_text = _text_field(row, "input", fmt, where, required=False)
        output = _text_field(row, "output", fmt, where)
        if alpaca_as_chat:
            return {"messages": alpaca_messages(instruction, input_text, output)}
        return {"prompt": alpaca_prompt(instruction, input_text), "completion": output}
    if fmt == "prompt-completion":
        if row.get("prompt") is None:  # an empty prompt is allowed, a missing one is not
            raise BadInputError(f"{where}: missing field 'prompt' (format {fmt})")
        prompt = _text_field(row, "prompt", fmt, where, required=False)
        return {"prompt": prompt, "completion": _text_field(row, "completion", fmt, where)}
    if fmt == "chat":
        converted = {"messages": _messages(row, where)}
        tools = _tools(row, where)
        if tools is not None:
            converted[TOOLS_FIELD] = tools
        return converted
    if fmt == "text":
        return {"text": _text_field(row, "text", fmt, where)}
    raise BadInputError(f"{source}: unknown dataset format {fmt!r} (expected {', '.join(FORMATS)})")


def convert_rows(raw: RawRows, fmt: str, *, alpaca_as_chat: bool = False) -> list[dict[str, Any]]:
    """All rows converted; the first bad row stops it with its file and row number."""
    return [
        convert_row(row, fmt, number, name, alpaca_as_chat=alpaca_as_chat)
        for row, (name, number) in zip(raw.rows, raw.refs, strict=True)
    ]


def row_refs(raw: RawRows) -> list[str]:
    return [f"{name}: row {number}" for name, number in raw.refs]


def validation_count(total: int, share: float) -> int:
    """Rows held out for validation: what datasets' train_test_split takes for `share`."""
    return math.ceil(share * total) if share > 0 else 0


# --- reading files ----------------------------------------------------------------------


def file_kind(path: Path) -> str:
    """jsonl | json | csv | parquet from the extension (a .gz suffix is looked through)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext not in EXTENSIONS:
        shown = f"'{ext}'" if ext else "(none)"
        raise BadInputError(
            f"{path.name}: unsupported file extension {shown} (expected {EXTENSION_LIST})"
        )
    return EXTENSIONS[ext]


def _json_object(value: Any, name: str, number: int) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadInputError(
            f"{name}: row {number}: expected a JSON object, got {type(value).__name__}"
        )
    return value


# One row of a data file is at most this long: a longer line is a broken export (a whole
# table on one line, binary data), and would otherwise be read whole into memory per row.
MAX_ROW_BYTES = 8 * 1024 * 1024


class _RowError(ValueError):
    """A row that parses as JSON but is not acceptable data; the message is the reason."""


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys: which value trains would be an accident.
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _RowError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _no_constant(name: str) -> Any:
    raise _RowError(f"{name} is not valid JSON")  # NaN, Infinity, -Infinity


def _load_json(text: str) -> Any:
    value = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
    try:  # "\ud800" decodes to a lone surrogate, which no tokenizer can encode
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _RowError("invalid Unicode escape (a lone surrogate)") from None
    return value


def parse_jsonl(text: str, name: str) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    # Lines end at "\n" (and "\r\n") only: str.splitlines would also cut a row at U+2028 or
    # a form feed, which JSON allows inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if len(line) > MAX_ROW_BYTES // 4 and len(line.encode("utf-8")) > MAX_ROW_BYTES:
            raise BadInputError(
                f"{name}: row {number}: {len(line.encode('utf-8')) // (1024 * 1024)} MiB on one "
                f"line, above the limit of {MAX_ROW_BYTES // (1024 * 1024)} MiB per row"
            )
        try:
            value = _load_json(line)
        except json.JSONDecodeError as error:
            raise BadInputError(
                f"{name}: row {number}: invalid JSON ({error.msg} at column {error.colno})"
            ) from None
        except _RowError as error:
            raise BadInputError(f"{name}: row {number}: {error}") from None
        rows.append((number, _json_object(value, name, number)))
    return rows


def parse_json(text: str, name: str) -> list[tuple[int, dict[str, Any]]]:
    try:
        value = _load_json(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # JSON Lines saved as .json
            return parse_jsonl(text, name)
        raise BadInputError(
            f"{name}: invalid JSON at line {error.lineno} column {error.colno} ({error.msg})"
        ) from None
    except _RowError as error:
        raise BadInputError(f"{name}: {error}") from None
    if isinstance(value, dict):  # a single object: one row
        value = [value]
    if not isinstance(value, list):
        raise BadInputError(f"{name}: expected a JSON array of objects, got {type(value).__name__}")
    return [(n, _json_object(v, name, n)) for n, v in enumerate(value, start=1)]


def parse_csv(text: str, name: str) -> list[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    try:
        for number, row in enumerate(reader, start=1):
            if None in row:  # DictReader keeps surplus cells under the key None
                raise BadInputError(
                    f"{name}: row {number}: more cells than the {len(reader.fieldnames or [])} "
                    "header columns"
                )
            # A short row leaves None in the missing cells: those fields are missing.
            rows.append((number, {k: v for k, v in row.items() if v is not None}))
    except csv.Error as error:
        raise BadInputError(f"{name}: row {reader.line_num}: invalid CSV ({error})") from None
    return rows


def parse_parquet(data: bytes, name: str) -> list[tuple[int, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as error:
        raise BadInputError(f"{name}: not a valid Parquet file ({error})") from None
    return list(enumerate(table.to_pylist(), start=1))


def parse_file(data: bytes, name: str, kind: str) -> list[tuple[int, dict[str, Any]]]:
    """(row number, row) pairs from one data file's bytes."""
    if name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise BadInputError(f"{name}: not a valid gzip file ({error})") from None
    if kind == "parquet":
        return parse_parquet(data, name)
    try:
        text = data.decode("utf-8-sig")  # tolerate a byte-order mark (spreadsheet exports)
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise BadInputError(
            f"{name}: line {line}: not UTF-8 text (byte {error.start}); save the file as UTF-8"
        ) from None
    parsers = {"jsonl": parse_jsonl, "json": parse_json, "csv": parse_csv}
    return parsers[kind](text, name)


def data_files(path: Path, uri: str) -> list[Path]:
    """The data files at `path`: the file itself, or a folder's data files in path order."""
    if path.is_file():
        file_kind(path)  # an unsupported extension fails here, naming the file
        return [path]
    candidates = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.name != SYNC_INDEX
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    files = []
    for candidate in candidates:
        try:
            file_kind(candidate)
        except BadInputError:
            continue  # a README or licence next to the data
        files.append(candidate)
    if not files:
        raise BadInputError(f"{uri}: no data files ({EXTENSION_LIST}) found")
    return files


def read_local(path: Path, uri: str) -> RawRows:
    files = data_files(path, uri)
    digest = hashlib.sha256()
    rows: list[dict[str, Any]] = []
    refs: list[tuple[str, int]] = []
    for file in files:
        data = file.read_bytes()
        digest.update(data)
        name = file.name if file == path else file.relative_to(path).as_posix()
        for number, row in parse_file(data, name, file_kind(file)):
            rows.append(row)
            refs.append((name, number))
    name = path.name if path.is_file() else uri
    return RawRows(rows=rows, refs=refs, name=name, digest=f"sha256:{digest.hexdigest()}")


def rows_digest(rows: Iterable[dict[str, Any]]) -> str:
    """SHA-256 of rows as canonical JSON lines (for data that has no files of ours)."""
    digest = hashlib.sha256()
    for row in rows:
        line = json.dumps(row, sort_keys=True, ensure_ascii=False, default=str)
        digest.update(line.encode("utf-8") + b"\n")
    return f"sha256:{digest.hexdigest()}"


def read_hub(uri: str, revision: str | None, cache_dir: Path) -> RawRows:
    """The "train" split of a Hugging Face Hub dataset."""
    repo_id = parse_uri(uri).repo_id
    try:
        dataset = datasets.load_dataset(
            repo_id,
            split="train",
            revision=revision,
            cache_dir=str(cache_dir / "datasets"),
            token=os.environ.get(ENV_HF_TOKEN) or None,
        )
    except DatasetNotFoundError:
        raise BadInputError(
            f"dataset not found: {uri} (no such dataset, or the token has no access)"
        ) from None
    except ConnectionError:
        if hub_offline():
            raise BadInputError(
                f"dataset not found: {uri} (not in the local cache and HF_HUB_OFFLINE is set)"
            ) from None
        raise  # the hub is unreachable: a transient failure, worth a retry
    except ValueError as error:  # e.g. no "train" split
        raise BadInputError(f"{uri}: {error}") from None
    rows = dataset.to_list()
    refs = [(uri, n) for n in range(1, len(rows) + 1)]
    return RawRows(rows=rows, refs=refs, name=uri, digest=rows_digest(rows))


def read_source(uri: str, *, cache_dir: Path, revision: str | None = None) -> RawRows:
    """Rows from any dataset URI, unconverted."""
    parsed = parse_uri(uri)
    if parsed.scheme == "hf":
        return read_hub(uri, revision, Path(cache_dir))
    if parsed.scheme == "s3":
        # One folder per URI, so two sources never mix their files.
        key = hashlib.sha256(uri.encode()).hexdigest()[:16]
        path = fetch(uri, Path(cache_dir) / "data" / key)
    else:
        path = fetch(uri, Path(cache_dir))
    return read_local(path, uri)


def load_rows(
    uri: str,
    *,
    cache_dir: Path,
    format: str = "auto",
    revision: str | None = None,
    alpaca_as_chat: bool = False,
) -> tuple[list[dict[str, Any]], str, RawRows]:
    """Converted rows, their format and the raw rows, from any dataset URI."""
    raw = read_source(uri, cache_dir=cache_dir, revision=revision)
    if not raw.rows:
        raise BadInputError(f"{raw.name}: dataset is empty (no rows)")
    fmt = detect_format(raw.columns, raw.name) if format == "auto" else format
    return convert_rows(raw, fmt, alpaca_as_chat=alpaca_as_chat), fmt, raw


def load_eval_rows(
    uri: str,
    *,
    cache_dir: Path,
    format: str = "auto",
    revision: str | None = None,
    alpaca_as_chat: bool = False,
) -> list[dict[str, Any]]:
    """Converted rows of an evaluation or regression data set (any format, see above)."""
    rows, _, _ = load_rows(
        uri, cache_dir=cache_dir, format=format, revision=revision, alpaca_as_chat=alpaca_as_chat
    )
    return rows


def load_training_data(
    spec: DatasetSpec, *, seed: int, cache_dir: Path, alpaca_as_chat: bool = False
) -> TrainingData:
    """Training and validation data for `spec`, checked row by row before any training.

    Validation comes from `spec.validationUri` when set (same format required), else
    `spec.validationSplit` of the rows is held out with `seed`, else there is none.
    `alpaca_as_chat`: alpaca rows become conversations (see `resolve_prompt_template`).
    """
    train_rows, fmt, raw = load_rows(
        spec.uri,
        cache_dir=cache_dir,
        format=spec.format,
        revision=spec.revision,
        alpaca_as_chat=alpaca_as_chat,
    )
    result = TrainingData(
        train=datasets.Dataset.from_list(train_rows),
        validation=None,
        format=fmt,
        digest=raw.digest,
        train_rows=len(train_rows),
        validation_rows=0,
        source=spec.uri,
        train_refs=row_refs(raw),
        prompt_template=("chat" if alpaca_as_chat else "alpaca") if fmt == "alpaca" else None,
    )
    if spec.validationUri:
        val_raw = read_source(spec.validationUri, cache_dir=cache_dir, revision=spec.revision)
        if not val_raw.rows:
            raise BadInputError(f"{val_raw.name}: validation dataset is empty (no rows)")
        val_fmt = detect_format(val_raw.columns, val_raw.name) if spec.format == "auto" else fmt
        if val_fmt != fmt:
            raise BadInputError(
                f"{val_raw.name}: validation data is {val_fmt} but the training data is {fmt}"
            )
        val_rows = convert_rows(val_raw, fmt, alpaca_as_chat=alpaca_as_chat)
        result.validation = datasets.Dataset.from_list(val_rows)
        result.validation_rows = len(val_rows)
        result.validation_refs = row_refs(val_raw)
        result.validation_source = spec.validationUri
        result.validation_digest = val_raw.digest
        return result
    held_out = validation_count(len(train_rows), spec.validationSplit)
    if held_out == 0:
        return result
    if held_out >= len(train_rows):
        raise BadInputError(
            f"{raw.name}: validationSplit {spec.validationSplit} of {len(train_rows)} rows "
            "leaves no training rows (lower spec.dataset.validationSplit or add rows)"
        )
    # A position column tells which rows went where (their refs follow them).
    indexed = result.train.add_column("_position", list(range(len(train_rows))))
    split = indexed.train_test_split(test_size=held_out, seed=seed, shuffle=True)
    refs = result.train_refs
    result.train_refs = [refs[i] for i in split["train"]["_position"]]
    result.validation_refs = [refs[i] for i in split["test"]["_position"]]
    result.train = split["train"].remove_columns("_position")
    result.validation = split["test"].remove_columns("_position")
    result.train_rows, result.validation_rows = len(split["train"]), len(split["test"])
    result.validation_source = f"{spec.uri} (held out: {held_out} rows, seed {seed})"
    return result


def ensure_chat_template(tokenizer: Any, template: str | None, source: str) -> None:
    """Give `tokenizer` the chat template chat data needs.

    `template` (spec.dataset.chatTemplate) wins; otherwise the tokenizer must bring one.
    `source` names the model in the error.
    """
    if template:
        from jinja2 import TemplateSyntaxError
        from transformers.utils import chat_template_utils

        try:
            # transformers' own compiler, so its extensions ({% generation %}) parse; a private
            # name, so a future transformers without it only skips this early check.
            compile_template = getattr(chat_template_utils, "_compile_jinja_template", None)
            if compile_template is not None:
                compile_template(template)
        except TemplateSyntaxError as error:
            raise BadInputError(
                f"spec.dataset.chatTemplate: invalid Jinja template "
                f"(line {error.lineno}: {error.message})"
            ) from None
        tokenizer.chat_template = template
        return
    if not getattr(tokenizer, "chat_template", None):
        raise BadInputError(
            f"{source}: the tokenizer has no chat template; chat data needs one "
            "(set spec.dataset.chatTemplate)"
        )

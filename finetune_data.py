"""Reading training data for finetune.py: which files a --data_path names (folders, ratios, links), what a file
holds (recognised by content: gzip, other encodings, Parquet/ZIP/... refused with the fix), JSONL and JSON
arrays read record by record with their line numbers, the format adapters (messages, ShareGPT, Alpaca,
MFTCoder chat_rounds: every record becomes `messages` + `tools`) and record validation
(`file:line: field: problem`).

Interface: resolve_data_spec(spec) -> entries; normalized_rows(entries, ...) yields validated rows for
datasets.Dataset.from_generator; read_json_records, detect_format, normalize_record, is_trained; the errors
DataError (a file or the data as a whole) and RecordError (one record).
"""

import difflib
import gzip
import json
import math
import os
import re
import zlib

from finetune_cli import suggest
from finetune_report import log0


class DataError(ValueError):
    """The data cannot be used: one line per problem, each starting with `file:line:` where there is one."""


DATA_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".arrow", ".xlsx", ".xls")  # refused with the fix
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT (`from`) and MFTCoder (`role`) speaker names -> our roles.
SPEAKER_ROLES = {
    "system": "system", "human": "user", "user": "user", "gpt": "assistant", "bot": "assistant",
    "assistant": "assistant", "model": "assistant", "function_call": "assistant", "observation": "tool",
    "function": "tool", "tool": "tool",
}


# Keys a message/turn may carry (messages, sharegpt, chat_rounds); a near-miss of one is a typo, an error.
MESSAGE_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id", "reasoning_content", "train",
                "loss_weight", "weight", "from", "value", "function_call")


class RecordError(ValueError):
    """A problem with one record: `field` names where (e.g. messages[2].content)."""

    def __init__(self, field_name, problem):
        super().__init__(f"{field_name}: {problem}")
        self.field_name, self.problem = field_name, problem


def parse_data_spec(spec):
    """'a.jsonl:0.5,dir/' -> [(path, ratio)]. Commas separate entries ('\\,' is a comma inside a name); a
    trailing ':RATIO' is a ratio only if the entry as written is not an existing path (so 'run:3/' works)."""
    entries = []
    for item in re.split(r"(?<!\\),", spec):
        item = os.path.expanduser(item.replace("\\,", ",").strip())
        if not item:
            continue
        path, ratio = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head and not os.path.exists(item):
            try:
                path, ratio = head, float(tail)
            except ValueError:
                raise FileNotFoundError(
                    f"--data_path: {head} exists, but {tail!r} after ':' is not a ratio (ENTRY:RATIO, e.g. "
                    f"{head}:0.5)" if os.path.exists(head) else
                    f"--data_path: {item} does not exist (a ',' inside a name is written '\\,')") from None
        if not os.path.exists(path):
            raise FileNotFoundError(f"--data_path: {path} does not exist "
                                    "(entries are separated by ','; a ',' inside a name is written '\\,')")
        if not (math.isfinite(ratio) and 0 < ratio <= 1000):
            raise ValueError(f"--data_path: ratio of {path} must be a number > 0 and <= 1000, got {tail!r}.")
        entries.append((path, ratio))
    if not entries:
        raise ValueError(f"--data_path '{spec}' names no file.")
    return entries


def file_id(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def list_data_files(path):
    """A file -> [(file, source)]; a folder -> its data files, recursively, following symbolic links to
    folders (a link to a folder that contains it is an error); source = the first-level sub-folder (one per
    task) or the folder's own name. Also returns what was not read, to be said once in the log and report:
    hidden files and folders (.ipynb_checkpoints/, .git/, ...) and files of other types."""
    skipped = {"hidden": [], "ignored": []}
    if not os.path.isdir(path):
        suffix = os.path.splitext(path[:-3] if path.endswith(".gz") else path)[1].lower()
        if suffix in TABLE_SUFFIXES:
            raise ValueError(f"--data_path: {path}: {suffix[1:].upper()} files are not supported; give "
                             f"{'/'.join(DATA_SUFFIXES)} (e.g. pandas: pd.read_{'csv' if suffix in ('.csv', '.tsv') else suffix[1:]}"
                             f"(...).to_json('data.jsonl', orient='records', lines=True)).")
        name = os.path.basename(path)
        for suffix in DATA_SUFFIXES:
            name = name[: -len(suffix)] if name.endswith(suffix) else name
        return [(path, name)], skipped
    root = os.path.normpath(path)
    files = []

    def walk(folder, ancestors):
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            raise ValueError(f"--data_path: cannot read folder {folder}: {e.strerror}") from None
        for name in names:
            full = os.path.join(folder, name)
            if name.startswith("."):
                skipped["hidden"].append(full)
            elif os.path.isdir(full):
                if file_id(full) in ancestors:
                    raise ValueError(f"--data_path: {full} links to {os.path.realpath(full)}, a folder that "
                                     "contains the link: a loop. Remove or fix the link.")
                walk(full, ancestors | {file_id(full)})
            elif not os.path.isfile(full):
                raise ValueError(f"--data_path: {full} is "
                                 f"{'a broken symbolic link (or a loop of links)' if os.path.islink(full) else 'not a regular file'}"
                                 "; remove it or fix the link.")
            elif name.lower().endswith(DATA_SUFFIXES):
                rel = os.path.relpath(folder, root)
                files.append((full, os.path.basename(root) if rel == "." else rel.split(os.sep)[0]))
            else:
                skipped["ignored"].append(full)

    walk(root, {file_id(root)})
    if not files:
        raise FileNotFoundError(f"--data_path: folder {path} has no {'/'.join(DATA_SUFFIXES)} files"
                                + (f" (skipped hidden: {', '.join(skipped['hidden'][:3])})" if skipped["hidden"] else "")
                                + (f" (ignored: {', '.join(skipped['ignored'][:3])})" if skipped["ignored"] else "") + ".")
    return files, skipped


def resolve_data_spec(spec):
    """--data_path -> ([(entry, ratio, [(file, source)])], skipped). A file reached twice (named twice, via
    a folder and by name, or through a link) is an error: it would silently double its data."""
    entries, skipped, seen = [], {"hidden": [], "ignored": []}, {}
    for i, (path, ratio) in enumerate(parse_data_spec(spec)):
        files, skip = list_data_files(path)
        for kind in skipped:
            skipped[kind] += skip[kind]
        for file, _ in files:
            other = seen.setdefault(file_id(file), (file, path, i))
            if other != (file, path, i):
                raise ValueError(f"--data_path: {file} would be read twice (entries {other[1]!r} and {path!r}"
                                 + (f", as {other[0]}" if other[0] != file else "") + "); give each file once, "
                                 f"and use a ratio to repeat data (e.g. {path}:2).")
        entries.append((path, ratio, files))
    return entries, skipped


# Leading bytes of files that are not JSON text -> what they are.
MAGIC = {b"PAR1": "a Parquet file", b"PK\x03\x04": "a ZIP archive", b"BZh": "bzip2-compressed",
         b"\xfd7zXZ": "xz-compressed", b"\x28\xb5\x2f\xfd": "zstd-compressed", b"ARROW1": "an Arrow file"}
ENCODINGS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def _open_json_text(path):
    """The file as a binary stream of UTF-8 JSON text, or DataError saying in one line what it is instead.
    gzip is recognised by its content, not its name."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    f = gzip.GzipFile(fileobj=raw) if raw.read(2) == b"\x1f\x8b" else None
    raw.seek(0)
    if f is None and path.lower().endswith(".gz"):
        raw.close()
        raise DataError(f"{path}: named .gz but not gzip data; rename it (drop .gz) or re-create it.")
    if f is not None and not path.lower().endswith(".gz"):
        log0(f"{path}: gzip-compressed although not named .gz; reading it decompressed.")
    f = f or raw
    head = f.read(4096)
    f.seek(0)
    kind = next((what for magic, what in MAGIC.items() if head.startswith(magic)), None)
    encoding = next((enc for bom, enc in ENCODINGS.items() if head.startswith(bom)), None)
    if encoding or (not kind and b"\x00" in head):
        f.close()
        raise DataError(f"{path}: text encoded as {encoding or 'UTF-16/UTF-32 (NUL bytes)'}, not UTF-8; convert "
                        f"it, e.g. iconv -f {encoding or 'UTF-16'} -t UTF-8 {path} > {path}.utf8")
    if kind:
        f.close()
        raise DataError(f"{path}: {kind}, not JSON text; give {'/'.join(DATA_SUFFIXES)} files.")
    return f


def _wrapper_key(value):
    """The key of a JSON object that holds the records as a list (e.g. {"version": 1, "data": [...]})."""
    if isinstance(value, dict) and detect_format(value) is None:
        for key, items in value.items():
            if isinstance(items, list) and items and isinstance(items[0], dict):
                return key
    return None


def _not_records(path, value, line):
    key = _wrapper_key(value)
    if key is not None:
        raise DataError(f"{path}:{line}: the top level is a JSON object, not records; the records seem to be the "
                        f"list under {key!r}: give that list as a JSON array or as JSONL (e.g. jq -c '.{key}[]' "
                        f"{path} > data.jsonl).")


def read_json_records(path):
    """Yield (line, record-or-RecordError) from a JSONL file or a JSON array (BOM, CRLF, blank lines ok).
    JSONL is streamed line by line; line numbers count '\\n' like editors do. A problem with the file as a
    whole (not JSON text, truncated gzip, data after the array, ...) raises DataError naming the file."""
    bom = b"\xef\xbb\xbf"
    try:
        f = _open_json_text(path)
        with f:
            head = b""
            while not head.strip():  # peek past leading whitespace: '[' means a JSON array
                chunk = f.read(65536)
                if not chunk:
                    break
                head += chunk
            f.seek(0)
            first = head.removeprefix(bom).lstrip()[:1]
            if not first:
                raise DataError(f"{path}: {'empty file' if not head else 'only blank lines'}: no records.")
            if first == b"[":
                yield from _array_records(path, f.read())
                return
            first_line = True
            for line_no, raw in enumerate(f, 1):
                raw = raw.removeprefix(bom)
                if not raw.strip():
                    continue
                was_first, first_line = first_line, False
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    yield line_no, RecordError("json", "not valid UTF-8")
                    continue
                except RecursionError:
                    yield line_no, RecordError("json", "nested too deeply")
                    continue
                except json.JSONDecodeError as e:
                    if was_first:
                        _whole_file_value(path, f)  # a pretty-printed object spans lines: say what it is
                    yield line_no, RecordError("json", f"invalid JSON ({e.msg} at column {e.colno})")
                    continue
                if was_first:
                    _not_records(path, record, line_no)
                yield line_no, record
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: corrupt or truncated gzip data ({e}); re-create or re-download it.") from None


def _whole_file_value(path, f):
    """Called when the first line of a non-array file is not JSON: a JSON object over several lines is
    either a wrapper of the records, or several pretty-printed objects (not JSONL); both get one line."""
    pos = f.tell()
    f.seek(0)
    try:
        value = json.loads(f.read().decode("utf-8-sig"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and e.lineno > 1:  # the first value is complete and spans lines
            raise DataError(f"{path}:{e.lineno}: several JSON values over several lines, one after another: "
                            "neither JSONL (one record per line) nor a JSON array; write one of those.") from None
        value = None
    except (UnicodeDecodeError, RecursionError):
        value = None
    f.seek(pos)
    _not_records(path, value, 1)
    if isinstance(value, dict):
        raise DataError(f"{path}: one JSON object over several lines, not JSONL (one record per line) or an "
                        "array of records; put it on one line or inside [ ].")


NEWLINE = b"\n"


def _array_records(path, data):
    """Records of a JSON array, one by one, with the line each starts on. A syntax error inside a record
    makes that record invalid; reading resumes at the next record, found as the next line that starts
    like the records do (same indentation, '{'), so the broken stretch is exactly one record. If records
    do not start lines (an array on one line), the file cannot be split and is refused."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{data.count(NEWLINE, 0, e.start) + 1}: not valid UTF-8.") from None
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    line, record_start = text.count("\n", 0, pos) + 1, None
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            line += text[pos] == "\n"
            pos += 1
        if pos >= len(text):
            raise DataError(f"{path}:{line}: the JSON array is not closed with ']' (truncated file?).")
        if text[pos] == "]":
            break
        indent = text[text.rfind("\n", 0, pos) + 1:pos]
        if record_start is None and not indent.strip():
            record_start = re.compile(r"\n" + re.escape(indent) + r"\{")
        try:
            record, end = decoder.raw_decode(text, pos)
        except (json.JSONDecodeError, RecursionError) as e:
            where = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            nxt = record_start.search(text, pos + 1) if record_start else None
            if record_start is None:
                raise DataError(f"{path}:{getattr(e, 'lineno', line)}: invalid JSON ({where}) in an array whose records "
                                "do not start lines, so the records after it cannot be told apart or counted. "
                                "Fix the file, or write JSONL (one record per line).") from None
            yield getattr(e, "lineno", line), RecordError("json", f"invalid JSON ({where})")
            if nxt is None:
                return  # the broken record was the last one: nothing after it is a record
            line += text.count("\n", pos, nxt.start() + 1)
            pos = nxt.start() + 1
            continue
        yield line, record
        line += text.count("\n", pos, end)
        pos = end
    rest = text[pos + 1:]
    if rest.strip():
        extra = line + rest[:len(rest) - len(rest.lstrip())].count("\n")
        raise DataError(f"{path}:{extra}: more data after the JSON array that ends on line {line}; a file holds "
                        "one array (files joined with cat? merge them: jq -s add a.json b.json > all.json). "
                        "JSONL needs one record object per line, not a list.")


def detect_format(record):
    if isinstance(record, dict):
        for key, fmt in (("messages", "messages"), ("conversations", "sharegpt"), ("chat_rounds", "chat_rounds")):
            if key in record:
                return fmt
        if "instruction" in record or "output" in record:
            return "alpaca"
    return None


def _text(content, where):
    """Content as a string: a string, None, or a list of OpenAI-style text parts."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, (dict, str)) for p in content):
        parts = []
        for p in content:
            if isinstance(p, str):
                parts.append(p)
            elif p.get("type", "text") == "text" and isinstance(p.get("text"), str):
                parts.append(p["text"])
            else:
                raise RecordError(where, f"unsupported content part {json.dumps(p)[:60]} (only text parts)")
        return "".join(parts)
    raise RecordError(where, f"content must be a string, got {type(content).__name__}")


def _tools(tools):
    if tools in (None, "", []):
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RecordError("tools", "not valid JSON")
    if isinstance(tools, dict) and not {"name", "function"} & tools.keys():
        example = next(iter(tools), "")
        raise RecordError("tools", f"an object keyed by function name ({example!r}, ...); write a list of "
                          f'function schemas: [{{"name": "{example}", "description": ..., "parameters": ...}}, ...]')
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError("tools", "must be a list of function schemas")
    tools = [t if "function" in t else {"type": "function", "function": t} for t in tools]
    for i, t in enumerate(tools):
        if not isinstance(t["function"], dict) or not isinstance(t["function"].get("name"), str):
            raise RecordError(f"tools[{i}]", "a function schema needs a name (and description, parameters)")
    return tools


def _tool_calls(calls, where):
    """OpenAI tool_calls or ShareGPT function_call payloads -> [{"type","function":{"name","arguments":dict}}]."""
    if isinstance(calls, str):
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError:
            raise RecordError(where, "function call is not valid JSON")
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RecordError(where, "each tool call needs a function name")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # templates render arguments with tojson: a dict, not a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}.arguments", f"not valid JSON ({e.msg} at column {e.colno}): "
                                  f"{fn['arguments'][:60]!r}") from None
        if not isinstance(args, dict):
            raise RecordError(f"{where}.arguments", f"must be a JSON object (or a string holding one), got "
                              f"{type(args).__name__}")
        item = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and "id" in call:
            item["id"] = call["id"]
        out.append(item)
    return out


def _message(role, content, field_name, item=None, tool_calls=None):
    """One normalized message, checking what every format needs; errors name the record's own field
    (field_name: where the content is; item: the source turn, whose train/loss_weight/... are kept)."""
    content = _text(content, field_name)
    if tool_calls:
        msg = {"role": role, "content": content or "", "tool_calls": tool_calls}  # "": what templates expect
    elif content is None:
        raise RecordError(field_name, "missing or null (must be a string)")
    elif role == "assistant" and not content.strip():
        raise RecordError(field_name, "empty assistant reply")
    else:
        msg = {"role": role, "content": content}
    prefix = field_name.rsplit(".", 1)[0]
    for key in item or {}:
        if key not in MESSAGE_KEYS and difflib.get_close_matches(key, MESSAGE_KEYS, n=1, cutoff=0.75):
            raise RecordError(f"{prefix}.{key}", f"unknown key{suggest(key, MESSAGE_KEYS)}")
    for key in ("name", "tool_call_id", "reasoning_content", "train", "loss_weight", "weight"):
        if key in (item or {}):
            msg["loss_weight" if key == "weight" else key] = item[key]  # weight: OpenAI fine-tuning's 0/1
    if not isinstance(msg.get("train", True), bool):
        raise RecordError(f"{prefix}.train", "must be true or false")
    weight = msg.get("loss_weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise RecordError(f"{prefix}.{'weight' if 'weight' in (item or {}) else 'loss_weight'}",
                          f"must be a finite number >= 0, got {weight!r}")
    return msg


def _from_messages(record):
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise RecordError("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RecordError(where, "must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise RecordError(f"{where}.role", f"unknown role {role!r} (expected {'/'.join(ROLES)})")
        if "content" not in m and not m.get("tool_calls"):
            raise RecordError(f"{where}.content", "missing")
        calls = _tool_calls(m["tool_calls"], f"{where}.tool_calls") if m.get("tool_calls") else None
        out.append(_message(role, m.get("content"), f"{where}.content", m, calls))
    return out, _tools(record.get("tools"))


def _from_speakers(turns, list_field, speaker_key, text_key, system=None):
    if not isinstance(turns, list) or not turns:
        raise RecordError(list_field, "must be a non-empty list")
    out = [_message("system", system, "system")] if system not in (None, "") else []
    for i, t in enumerate(turns):
        where = f"{list_field}[{i}]"
        if not isinstance(t, dict):
            raise RecordError(where, "must be an object")
        sk, tk = (speaker_key, text_key) if speaker_key in t or "role" not in t else ("role", "content")
        speaker = t.get(sk)
        role = SPEAKER_ROLES.get(speaker)
        if role is None:
            raise RecordError(f"{where}.{sk}", f"unknown speaker {speaker!r} "
                              f"(expected one of {', '.join(sorted(SPEAKER_ROLES))})")
        calls = _tool_calls(t.get(tk), f"{where}.{tk}") if speaker == "function_call" else None
        out.append(_message(role, None if calls else t.get(tk), f"{where}.{tk}", t, calls))
    return out


def _from_sharegpt(record):
    msgs = _from_speakers(record["conversations"], "conversations", "from", "value", record.get("system"))
    return msgs, _tools(record.get("tools"))


def _from_chat_rounds(record):
    return _from_speakers(record["chat_rounds"], "chat_rounds", "role", "content", record.get("system")), None


def _from_alpaca(record):
    for key in ("instruction", "output", "input", "system"):
        optional = key in ("input", "system")
        if not isinstance(record.get(key), str) and not (optional and record.get(key) is None):
            raise RecordError(key, "missing or not a string" if not optional else "must be a string")
    msgs = [_message("system", record["system"], "system")] if record.get("system") else []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise RecordError("history", "must be a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RecordError(f"history[{i}]", "must be a [question, answer] pair of strings")
        msgs += [_message("user", pair[0], f"history[{i}][0]"), _message("assistant", pair[1], f"history[{i}][1]")]
    prompt = record["instruction"] + ("\n" + record["input"] if record.get("input") else "")
    msgs += [_message("user", prompt, "instruction"), _message("assistant", record["output"], "output")]
    return msgs, None


ADAPTERS = {"messages": _from_messages, "sharegpt": _from_sharegpt, "alpaca": _from_alpaca,
            "chat_rounds": _from_chat_rounds}
RECORD_KEYS = ("messages", "conversations", "chat_rounds", "tools", "system", "source", "instruction", "input",
               "output", "history")
REQUIRED_KEY = {"messages": "messages", "sharegpt": "conversations", "chat_rounds": "chat_rounds",
                "alpaca": "instruction"}


def normalize_record(record, fmt):
    """Any supported record -> (messages, tools), or RecordError naming the field and the problem."""
    if not isinstance(record, dict):
        raise RecordError("record", f"must be a JSON object, got {type(record).__name__}")
    for key in record:
        if key not in RECORD_KEYS and difflib.get_close_matches(key, RECORD_KEYS, n=1, cutoff=0.75):
            raise RecordError(key, f"unknown key{suggest(key, RECORD_KEYS)}")
    if REQUIRED_KEY[fmt] not in record:
        raise RecordError(REQUIRED_KEY[fmt], f"missing (file read as {fmt} format)")
    messages, tools = ADAPTERS[fmt](record)
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise RecordError(REQUIRED_KEY[fmt], "no assistant turn to train on")
    if not any(is_trained(m) for m in assistants):
        raise RecordError(REQUIRED_KEY[fmt], "every assistant turn is excluded (train: false / loss_weight: 0)")
    return messages, tools


def is_trained(message):
    return message.get("train", True) is not False and message.get("loss_weight", 1) != 0


def invalid_reason(error):
    """'messages[3].role: unknown role 'x' (expected ...)' -> 'messages[].role: unknown role 'x'': the key
    under which the report counts invalid records."""
    return re.sub(r"\[\d+\]", "[]", error.split(" (")[0])


def tally(counter, key, n=1):
    counter[key] = counter.get(key, 0) + n


def normalized_rows(entries, data_format, skip_invalid, stats):
    """Generator for datasets.Dataset.from_generator: reads every file, validates, normalizes. Without
    --skip_invalid_records the first invalid record stops the output but not the reading: every file is
    still validated so that the error names the total count."""
    errors, n_invalid = [], 0

    def fail(last=None, stopped=False):
        lines = errors + ([last] if last else [])
        if stopped and n_invalid:
            lines.append(f"(reading stopped there: at least {n_invalid} invalid records in all)")
        elif n_invalid > len(errors):
            lines.append(f"({n_invalid} invalid records in all; the first {len(errors)} are shown)")
        raise DataError("\n".join(lines))

    for entry_idx, (_, _, files) in enumerate(entries):
        for file, source in files:
            fmt = None if data_format == "auto" else data_format
            fstats = {"records": 0, "invalid": 0, "samples": 0, "truncated": 0, "dropped": 0}
            stats["files"][file] = fstats
            try:
                for line, record in read_json_records(file):
                    fstats["records"] += 1
                    try:
                        if isinstance(record, RecordError):
                            raise record
                        if not isinstance(record, dict):
                            raise RecordError("record", f"must be a JSON object, got {type(record).__name__}")
                        fmt = fmt or detect_format(record)
                        if fmt is None:
                            near = [k for k in record if suggest(k, list(REQUIRED_KEY.values()))]
                            raise RecordError("record", "unknown format: expected messages, conversations, "
                                              "chat_rounds or instruction/output fields"
                                              + (f"; {near[0]!r}{suggest(near[0], list(REQUIRED_KEY.values()))}" if near else ""))
                        fstats["format"] = fmt
                        messages, tools = normalize_record(record, fmt)
                    except RecordError as e:
                        fstats["invalid"] += 1
                        n_invalid += 1
                        tally(stats["invalid"], invalid_reason(str(e)))
                        if not skip_invalid and len(errors) < 20:
                            errors.append(f"{file}:{line}: {e}")
                        continue
                    if not errors:
                        stats["rows"] += 1
                        yield {"conversation": json.dumps({"messages": messages, "tools": tools}, ensure_ascii=False),
                               "source": str(record.get("source") or source), "origin": f"{file}:{line}",
                               "entry": entry_idx}
            except DataError as e:  # the file as a whole: reading stops, so the count is a lower bound
                fail(str(e), stopped=True)
            if fstats["records"] == 0:
                fail(f"{file}: no records (an empty JSON array).", stopped=True)
    if errors:
        fail()

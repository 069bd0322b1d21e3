"""Hostile but realistic input: every record is trained or counted with its reason, never lost or doubled
without a word; every user mistake is one `[finetune] error:` line and exit code 2, no traceback.

One class per kind of promise. Pure checks call the functions in-process; what a user sees runs
finetune.main() in-process (the same path as the command line, exit code and stderr included) and one real
subprocess dry run covers folders, links and report counts end to end."""

import gzip
import json
import os
import sys

import pytest

import finetune as ft
import finetune_cache
import finetune_data as fd
import finetune_sources as fsrc
from conftest import run_finetune, write_jsonl


def chat(i=0, **extra):
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}", **extra}]}


def read(path):
    return [(line, str(r) if isinstance(r, ft.RecordError) else r) for line, r in fd.read_json_records(str(path))]


def data_error(path):
    with pytest.raises(ft.DataError) as e:
        read(path)
    return str(e.value)


def run_main(args, monkeypatch, capsys):
    """finetune.py's __main__ (exit_when_done(main)) with these command-line arguments -> (exit code, stdout +
    stderr)."""
    monkeypatch.setattr(sys, "argv", ["finetune.py", *map(str, args)])
    code = 0
    try:
        ft.exit_when_done(ft.main)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def dry_run_args(model, data, tmp_path, *flags):
    return ["--model_name_or_path", model, "--data_path", data, "--output_dir", tmp_path / "out",
            "--dataset_cache_dir", tmp_path / "cache", "--dry_run", "True", *flags]


def user_error(args, monkeypatch, capsys):
    """Runs main(); asserts exit 2, exactly one `[finetune] error:` line, no traceback; returns the message."""
    code, out = run_main(args, monkeypatch, capsys)
    assert code == 2, out[-3000:]
    assert out.count("[finetune] error:") == 1 and "Traceback" not in out, out[-3000:]
    return out[out.index("[finetune] error:"):]


class TestNothingLostOrDoubled:
    def test_json_is_read_to_its_end(self, tmp_path):
        two = tmp_path / "cat.json"  # cat a.json b.json
        two.write_text(json.dumps([chat(1), chat(2)], indent=1) + "\n" + json.dumps([chat(3)], indent=1))
        assert "cat.json:27: more data after the JSON array that ends on line 26" in data_error(two)
        lines = tmp_path / "lists.jsonl"  # JSONL whose first line is a list
        lines.write_text(json.dumps([chat(1)]) + "\n" + json.dumps(chat(2)) + "\n")
        assert "lists.jsonl:2: more data after the JSON array that ends on line 1" in data_error(lines)
        later = tmp_path / "later.jsonl"  # a list on a later line is an invalid record at its line
        later.write_text(json.dumps(chat(1)) + "\n" + json.dumps([chat(2)]) + "\n")
        assert read(later)[1][0] == 2
        with pytest.raises(ft.RecordError, match="must be a JSON object, got list"):
            fd.normalize_record(read(later)[1][1], "messages")
        unclosed = tmp_path / "unclosed.json"
        unclosed.write_text(json.dumps([chat(1)], indent=1)[:-1])
        assert "not closed" in data_error(unclosed)

    def test_a_broken_record_in_an_array_counts_as_one_and_reading_goes_on(self, tmp_path):
        text = json.dumps([chat(i) for i in range(1000)], indent=2)
        text = text.replace('"q500"', '"q500" oops', 1)  # record 500 of 1,000
        (tmp_path / "a.json").write_text(text)
        got = read(tmp_path / "a.json")
        assert len(got) == 1000
        bad = [(line, r) for line, r in got if isinstance(r, str)]
        assert len(bad) == 1 and bad[0][0] == text.count("\n", 0, text.index("oops")) + 1
        assert got[501][1] == chat(501) and got[-1][1] == chat(999)
        # a record whose closing brace is missing: the next record is still found, 10 records in all
        text = json.dumps([chat(i) for i in range(10)], indent=2)
        k = text.index('"a4"')
        (tmp_path / "b.json").write_text(text[:k] + text[k:].replace("}", "", 1))
        got = read(tmp_path / "b.json")
        assert len(got) == 10 and [i for i, (_, r) in enumerate(got) if isinstance(r, str)] == [4]
        # records not starting lines: the rest cannot be counted, so the file is refused, saying why
        (tmp_path / "c.json").write_text(json.dumps([chat(1), chat(2), chat(3)]).replace('"q2"', '"q2" x'))
        assert "cannot be told apart or counted" in data_error(tmp_path / "c.json")

    def test_folders_skip_hidden_follow_links_detect_loops_and_doubles(self, tmp_path, capsys):
        write_jsonl(tmp_path / "d" / "task" / "a.jsonl", [chat()])
        write_jsonl(tmp_path / "d" / ".ipynb_checkpoints" / "a-checkpoint.jsonl", [chat()])
        (tmp_path / "d" / ".hidden.jsonl").write_text(json.dumps(chat()))
        (tmp_path / "d" / "notes.txt").write_text("x")
        write_jsonl(tmp_path / "d" / "task" / "UPPER.JSONL", [chat()])
        write_jsonl(tmp_path / "elsewhere" / "b.jsonl", [chat()])
        os.symlink(tmp_path / "elsewhere", tmp_path / "d" / "linked")
        files, skipped = fsrc.list_data_files(str(tmp_path / "d"))
        assert files == [(str(tmp_path / "d" / "linked" / "b.jsonl"), "linked"),
                         (str(tmp_path / "d" / "task" / "UPPER.JSONL"), "task"),
                         (str(tmp_path / "d" / "task" / "a.jsonl"), "task")]
        assert skipped == {"hidden": [str(tmp_path / "d" / ".hidden.jsonl"),
                                      str(tmp_path / "d" / ".ipynb_checkpoints")],
                           "ignored": [str(tmp_path / "d" / "notes.txt")]}
        os.symlink(tmp_path / "d", tmp_path / "d" / "task" / "back")
        with pytest.raises(ValueError, match="a folder that contains the link: a loop"):
            fsrc.list_data_files(str(tmp_path / "d"))
        os.remove(tmp_path / "d" / "task" / "back")
        os.symlink(tmp_path / "nowhere", tmp_path / "d" / "dangling.jsonl")
        with pytest.raises(ValueError, match="broken symbolic link"):
            fsrc.list_data_files(str(tmp_path / "d"))
        os.remove(tmp_path / "d" / "dangling.jsonl")
        a, b = tmp_path / "d" / "task" / "a.jsonl", tmp_path / "elsewhere" / "b.jsonl"
        for spec in (f"{a},{a}", f"{tmp_path / 'd'},{b}", f"{a},{tmp_path / 'd' / 'task'}:2"):
            with pytest.raises(ValueError, match="would be read twice"):
                ft.resolve_data_spec(spec)
        assert len(ft.resolve_data_spec(f"{a}:2")[0]) == 1  # repetition is what ratios are for
        margs, dargs, targs, largs = ft.parse_args(["--model_name_or_path", "m", "--data_path", str(tmp_path / "d"),
                                                    "--eval_data_path", str(b), "--output_dir", str(tmp_path / "o")])
        ft.validate_args(margs, dargs, targs, largs)
        assert f"also in --data_path (evaluated on training data): {b}" in capsys.readouterr().out

    def test_dry_run_report_counts_equal_the_files(self, tiny_model, tmp_path):
        """End to end in a real process: hidden folder not read, linked task read, other files listed once,
        a broken array record counted, and records = valid + invalid = what the files hold."""
        d = tmp_path / "data"
        write_jsonl(d / "t1" / "a.jsonl", [chat(i) for i in range(3)])
        write_jsonl(d / ".ipynb_checkpoints" / "a-checkpoint.jsonl", [chat(i) for i in range(3)])
        (d / "README.md").write_text("about")
        write_jsonl(tmp_path / "shared_task" / "b.jsonl", [chat(i) for i in range(2)])
        os.symlink(tmp_path / "shared_task", d / "t2")
        arr = json.dumps([chat(i) for i in range(6)], indent=2).replace('"q3"', '"q3" x', 1)
        (d / "t1" / "c.json").write_text(arr)
        proc = run_finetune(dry_run_args(tiny_model, d, tmp_path, "--skip_invalid_records", "True"))
        assert proc.stdout.count("1 hidden, skipped: ") == 1 and "README.md" in proc.stdout
        report = json.loads((tmp_path / "out" / "data_report.json").read_text())["train"]
        assert report["records"] == 3 + 2 + 6 == report["records_valid"] + sum(report["invalid"].values())
        assert report["records_valid"] == 10 and report["samples"] == 10
        assert report["samples_per_source"] == {"t1": 8, "t2": 2}
        assert report["skipped_files"] == {"hidden": [str(d / ".ipynb_checkpoints")], "ignored": [str(d / "README.md")]}

    def test_a_ratio_or_skip_that_leaves_an_entry_empty_is_an_error(self, tiny_model, tmp_path, monkeypatch, capsys):
        good = write_jsonl(tmp_path / "good.jsonl", [chat(i) for i in range(5)])
        msg = user_error(dry_run_args(tiny_model, f"{good}:0.1", tmp_path), monkeypatch, capsys)
        assert f"entry {good}:0.1 keeps no sample of its 5; use a ratio of at least 0.2" in msg
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"x": 1}, {"x": 2}])
        msg = user_error(dry_run_args(tiny_model, f"{good},{bad}", tmp_path, "--skip_invalid_records", "True"),
                         monkeypatch, capsys)
        assert f"entry {bad}:1 keeps no sample" in msg
        assert not (tmp_path / "out").exists()


class TestRecordValidation:
    @pytest.mark.parametrize("record,expected", [
        ({"messages": [{"role": "user", "content": "w"}, {"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "{city: Paris"}}]}]},
         "messages[1].tool_calls.arguments: not valid JSON"),
        ({"messages": [{"role": "user", "content": "w"}, {"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "[1, 2]"}}]}]},
         "messages[1].tool_calls.arguments: must be a JSON object (or a string holding one), got list"),
        ({**chat(), "tools": {"get_weather": {"description": "d", "parameters": {}}}},
         "tools: an object keyed by function name ('get_weather', ...)"),
        ({**chat(), "tools": [{"description": "no name"}]}, "tools[0]: a function schema needs a name"),
        (chat(loss_weight=float("nan")), "messages[1].loss_weight: must be a finite number >= 0, got nan"),
        (chat(loss_weight=float("inf")), "messages[1].loss_weight: must be a finite number >= 0"),
        (chat(loss_weight=-1), "messages[1].loss_weight: must be a finite number >= 0"),
        (chat(loss_weigth=0), "messages[1].loss_weigth: unknown key (did you mean 'loss_weight'?)"),
        (chat(trian=False), "messages[1].trian: unknown key (did you mean 'train'?)"),
        ({**chat(), "tool": []}, "tool: unknown key (did you mean 'tools'?)"),
    ])
    def test_invalid(self, record, expected):
        with pytest.raises(ft.RecordError) as e:
            fd.normalize_record(record, "messages")
        assert str(e.value).startswith(expected), str(e.value)

    def test_valid_and_openai_weight(self):
        calls = {"messages": [{"role": "user", "content": "w"}, {"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": '{"city": "Paris"}'}}], "id": "x", "thinking": "ok"},
            {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}
        msgs, _ = fd.normalize_record(calls, "messages")  # unrelated extra keys stay allowed
        assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
        msgs, _ = fd.normalize_record({"messages": chat(1)["messages"] + [
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "b", "weight": 0}]}, "messages")
        assert msgs[3]["loss_weight"] == 0 and not ft.is_trained(msgs[3])  # OpenAI fine-tuning's weight

    def test_sharegpt_function_call_arguments(self):
        bad = {"conversations": [{"from": "human", "value": "w"},
                                 {"from": "function_call", "value": '{"name": "f", "arguments": "nope"}'},
                                 {"from": "observation", "value": "x"}, {"from": "gpt", "value": "ok"}]}
        with pytest.raises(ft.RecordError, match=r"conversations\[1\].value.arguments: not valid JSON"):
            fd.normalize_record(bad, "sharegpt")


class TestUserErrorsExit2:
    def test_flag_ranges_before_any_data(self, tiny_model, tmp_path, monkeypatch, capsys):
        missing = write_jsonl(tmp_path / "data.jsonl", [chat()])  # never read: no cache dir is made
        for flag, value in [("--lora_r", 0), ("--lora_alpha", -1), ("--per_device_train_batch_size", 0),
                            ("--gradient_accumulation_steps", 0), ("--learning_rate", "nan"), ("--learning_rate", -1),
                            ("--num_train_epochs", -1), ("--model_max_length", 8), ("--logging_steps", 0),
                            ("--save_steps", 0), ("--lora_dropout", 1.5), ("--seed", -1),
                            ("--per_device_eval_batch_size", 0), ("--warmup_ratio", 2)]:
            msg = user_error(dry_run_args(tiny_model, missing, tmp_path, flag, value), monkeypatch, capsys)
            assert flag in msg, msg  # ours, or transformers' own check (logging/save steps)
        msg = user_error(dry_run_args(tiny_model, missing, tmp_path, "--lora_r", "abc"), monkeypatch, capsys)
        assert "--lora_r" in msg and "invalid int value: 'abc'" in msg
        msg = user_error(dry_run_args(tiny_model, missing, tmp_path, "--lerning_rate", "1"), monkeypatch, capsys)
        assert "unknown flag --lerning_rate (did you mean 'learning_rate'?)" in msg
        assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()

    def test_paths_model_output_and_config(self, tiny_model, tmp_path, monkeypatch, capsys):
        good = write_jsonl(tmp_path / "good.jsonl", [chat()])
        (tmp_path / "afile").write_text("x")
        (tmp_path / "empty_model").mkdir()
        cases = [
            (["--model_name_or_path", tmp_path / "no_such_model"], "no such local folder"),
            (["--model_name_or_path", tmp_path / "empty_model"], "has no config.json"),
            (["--output_dir", tmp_path / "afile"], "--output_dir " + str(tmp_path / "afile") + " is a file"),
            (["--output_dir", tmp_path / "afile" / "sub"], "is a file, so the folder cannot be created"),
            (["--output_dir", "/proc/finetune-out"], "--output_dir /proc/finetune-out: cannot write in /proc"),
            (["--dataset_cache_dir", tmp_path / "afile"],
             "--dataset_cache_dir " + str(tmp_path / "afile") + " is a file"),
            (["--deepspeed", tmp_path / "bad.json"],
             "--deepspeed " + str(tmp_path / "bad.json") + " is not valid JSON"),
            (["--data_path", f"{good}:inf"], "ratio of " + good + " must be a number > 0 and <= 1000, got 'inf'"),
            (["--data_path", f"{good}:nan"], "must be a number > 0 and <= 1000, got 'nan'"),
            (["--data_path", f"{good}:0"], "must be a number > 0 and <= 1000, got '0'"),
            (["--data_path", f"{good}:1e6"], "must be a number > 0 and <= 1000, got '1e6'"),
            (["--data_path", f"{good}:abc"], f"{good} exists, but 'abc' after ':' is not a ratio"),
            (["--data_path", tmp_path / "a.xlsx"], "a.xlsx: not a data file finetune reads"),
        ]
        (tmp_path / "a.xlsx").write_bytes(b"PK\x03\x04")
        (tmp_path / "bad.json").write_text("a,b")
        for args, expected in cases:
            argv = dry_run_args(tiny_model, good, tmp_path) + [str(a) for a in args]  # the last flag wins
            msg = user_error(argv, monkeypatch, capsys)
            assert expected in msg, msg
        assert not (tmp_path / "out").exists()
        (tmp_path / "no_weights").mkdir()
        (tmp_path / "no_weights" / "config.json").write_text("{}")
        argv = dry_run_args(tmp_path / "no_weights", good, tmp_path)
        argv.remove("--dry_run"), argv.remove("True")
        assert "has no weights (*.safetensors or *.bin)" in user_error(argv, monkeypatch, capsys)
        cfg = tmp_path / "run.yaml"
        cfg.write_text(f"model_name_or_path: {tiny_model}\ndata_path: {good}\nlerning_rate: 1e-4\n")
        msg = user_error([cfg], monkeypatch, capsys)
        assert f"config file {cfg}: unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in msg
        cfg.write_text("model_name_or_path: [\n")
        assert f"config file {cfg} is not valid YAML" in user_error([cfg], monkeypatch, capsys)
        cfg = tmp_path / "run.json"
        cfg.write_text('{"model_name_or_path": 1,}')
        assert f"config file {cfg} is not valid JSON" in user_error([cfg], monkeypatch, capsys)

    def test_subprocess_keeps_no_traceback_unless_asked(self, tiny_model, tmp_path):
        good = write_jsonl(tmp_path / "good.jsonl", [chat()])
        args = dry_run_args(tiny_model, good, tmp_path, "--per_device_train_batch_size", "0")
        proc = run_finetune(args, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stdout
        assert "[finetune] error: --per_device_train_batch_size 0: must be a finite number >= 1." in proc.stdout
        proc = run_finetune(args, check=False, env={"FINETUNE_TRACEBACK": "1"})
        assert proc.returncode != 0 and "Traceback" in proc.stdout
        # a plausible hub id that cannot be loaded (offline here): one line, not OSError's traceback
        proc = run_finetune(dry_run_args("models/qwen-7b", good, tmp_path), check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stdout
        assert ("[finetune] error: --model_name_or_path models/qwen-7b: not a local folder, and no tokenizer could "
                "be loaded") in proc.stdout


class TestFileKinds:
    def test_each_kind_is_one_line(self, tmp_path):
        body = "".join(json.dumps(chat(i)) + "\n" for i in range(50)).encode()
        gz = gzip.compress(body)
        cases = {
            "u16.jsonl": (body.decode().encode("utf-16"), "text encoded as UTF-16, not UTF-8"),
            "u32.jsonl": (body.decode().encode("utf-32"), "text encoded as UTF-32, not UTF-8"),
            "u16le.jsonl": (body.decode().encode("utf-16-le"), "UTF-16 (NUL bytes between the characters)"),
            "wrap.json": (json.dumps({"version": 1, "data": [chat()]}, indent=2).encode(), "under 'data'"),
            "wrap1.json": (json.dumps({"version": 1, "data": [chat()]}).encode(), "under 'data'"),
            "empty.jsonl": (b"", "empty file: no records"),
            "blank.jsonl": (b"\n  \n\r\n", "only blank lines: no records"),
            "trunc.jsonl.gz": (gz[: len(gz) // 2], "corrupt or truncated gzip data"),
            "corrupt.jsonl.gz": (gz[:20] + b"garbage" * 20, "corrupt or truncated gzip data"),
            "plain.jsonl.gz": (body, "named .gz but not gzip data"),
            "p.jsonl": (b"PAR1" + b"\x00" * 20, "a Parquet file, not JSON text"),
            "pretty.jsonl": ((json.dumps(chat(), indent=2) * 2).encode(), "several JSON values over several lines"),
        }
        for name, (content, expected) in cases.items():
            (tmp_path / name).write_bytes(content)
            msg = data_error(tmp_path / name)
            assert msg.startswith(str(tmp_path / name)) and expected in msg and "\n" not in msg, (name, msg)
        (tmp_path / "gz.jsonl").write_bytes(gz)  # gzip without .gz: read by content
        assert len(read(tmp_path / "gz.jsonl")) == 50

    def test_path_lists_commas_and_colons(self, tmp_path):
        write_jsonl(tmp_path / "a,b.jsonl", [chat()])
        write_jsonl(tmp_path / "run:3" / "c.jsonl", [chat()])
        write_jsonl(tmp_path / "d.jsonl", [chat()])
        spec = f"{tmp_path}/a\\,b.jsonl:2, {tmp_path}/run:3,{tmp_path}/run:3:0.5,{tmp_path}/d.jsonl"
        assert fsrc.parse_data_spec(spec) == [(f"{tmp_path}/a,b.jsonl", 2.0), (f"{tmp_path}/run:3", 1.0),
                                            (f"{tmp_path}/run:3", 0.5), (f"{tmp_path}/d.jsonl", 1.0)]
        with pytest.raises(FileNotFoundError, match=r"a,b.jsonl' does not exist|a does not exist"):
            fsrc.parse_data_spec(f"{tmp_path}/a,b.jsonl")
        with pytest.raises(FileNotFoundError, match="x.jsonl:abc does not exist"):
            fsrc.parse_data_spec(f"{tmp_path}/x.jsonl:abc")
        # repeating --data_path adds entries; a YAML list is joined the same way (commas escaped)
        flags = ["--model_name_or_path", "m", "--output_dir", str(tmp_path / "out")]
        _, dargs, _, _ = ft.parse_args(flags + ["--data_path", "a", "--data-path=b", "--data_path", "c"])
        assert dargs.data_path == "a,b,c"
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"data_path:\n  - {tmp_path}/a,b.jsonl\n  - {tmp_path}/d.jsonl\neval_data_path: null\n")
        _, dargs, _, _ = ft.parse_args([str(cfg), *flags])
        assert fsrc.parse_data_spec(dargs.data_path) == [(f"{tmp_path}/a,b.jsonl", 1.0), (f"{tmp_path}/d.jsonl", 1.0)]
        assert dargs.eval_data_path is None


class TestErrorTotals:
    def test_total_after_twenty_and_at_least_when_reading_stopped(self, tmp_path):
        bad = tmp_path / "bad.jsonl"
        bad.write_text("".join("{" + " " * i + "nope\n" for i in range(100)) + json.dumps(chat()) + "\n")
        entries, _ = ft.resolve_data_spec(str(bad))
        with pytest.raises(ft.DataError) as e:
            list(fd.normalized_rows(entries, "auto", False, {"files": {}, "invalid": {}, "rows": 0}))
        lines = str(e.value).splitlines()
        assert len(lines) == 21 and lines[19].startswith(f"{bad}:20: json: invalid JSON")
        assert lines[20] == "(100 invalid records in all; the first 20 are shown)"
        # the same problem in every record: one line, with where the next few are
        bad.write_text("{nope\n" * 100 + json.dumps(chat()) + "\n")
        with pytest.raises(ft.DataError) as e:
            list(fd.normalized_rows(entries, "auto", False, {"files": {}, "invalid": {}, "rows": 0}))
        assert str(e.value) == (f"{bad}:1: json: invalid JSON (Expecting property name enclosed in double quotes at "
                                "column 2) (and 99 more records like it: 2, 3, 4, 5, 6, ...)")
        (tmp_path / "z.jsonl.gz").write_bytes(gzip.compress(b"{}\n" * 100)[:-12])
        entries, _ = ft.resolve_data_spec(f"{bad},{tmp_path / 'z.jsonl.gz'}")
        with pytest.raises(ft.DataError) as e:
            list(fd.normalized_rows(entries, "auto", True, {"files": {}, "invalid": {}, "rows": 0}))
        assert "corrupt or truncated gzip" in str(e.value) and "at least 100 invalid records" in str(e.value)

    def test_every_sample_too_long_names_model_max_length(self, tiny_model, tmp_path, monkeypatch, capsys):
        path = write_jsonl(tmp_path / "long.jsonl", [chat(" ".join(["word"] * 300))])
        msg = user_error(dry_run_args(tiny_model, path, tmp_path, "--model_max_length", "32"), monkeypatch, capsys)
        assert "every prompt is longer than --model_max_length 32: raise it" in msg


class TestCacheKey:
    def test_in_place_edit_with_same_size_and_mtime_is_noticed(self, tiny_model, tmp_path):
        from transformers import AutoTokenizer

        path = write_jsonl(tmp_path / "a.jsonl", [chat(1)])
        margs, dargs, targs, _ = ft.parse_args(["--model_name_or_path", tiny_model, "--data_path", path,
                                               "--output_dir", str(tmp_path / "out")])
        tok = AutoTokenizer.from_pretrained(tiny_model)
        st = os.stat(path)
        key = finetune_cache.cache_key(ft.resolve_data_spec(path)[0], tok, dargs, targs)
        with open(path, "r+") as f:  # same size, then the old mtime put back
            text = f.read().replace("q1", "q2")
            f.seek(0)
            f.write(text)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
        assert finetune_cache.cache_key(ft.resolve_data_spec(path)[0], tok, dargs, targs) != key

"""Data as users have it (issue 17): Parquet, Arrow, CSV/TSV and .txt files; folders laid out as Hugging Face
dataset repositories or written by save_to_disk; Hub dataset ids read from a Hugging Face cache laid out here
(offline); LLaMA-Factory's dataset_info.json (--dataset_dir/--dataset); TRL's prompt/completion and text
formats; --columns; --val_size; --chat_template_kwargs; and the hostile versions of each (nested and null
Parquet columns, wrong column types, CSV quotes/BOM/ragged lines, NUL bytes, wrong file names, empty splits).

Files are written by the test with pyarrow/datasets, read through build_dataset in-process (the path a run takes)
or finetune.main() for what a user sees; three real subprocesses: a dry run on a Hub id from a laid-out cache,
a short training run (text + packing + --val_size, prompt/completion Parquet), and the offline-unknown-id error."""

import csv
import json
import os
from pathlib import Path

import pytest

import finetune as ft
import finetune_cache
import finetune_data as fd
import finetune_sources as fsrc
from conftest import SHARED, read_log_history, run_finetune, write_jsonl
from test_bad_input import dry_run_args, run_main, user_error

DATA = SHARED / "data"
GRANITE = SHARED / "templates" / "ibm-granite-granite-3.3-2B-Instruct.jinja"


def pa():
    import pyarrow

    return pyarrow


def write_parquet(path, rows, **kwargs):
    import pyarrow.parquet as pq

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa().Table.from_pylist(rows), str(path), **kwargs)
    return str(path)


def chats(n, tag="q"):
    return [{"messages": [{"role": "user", "content": f"{tag}{i} asks"},
                          {"role": "assistant", "content": f"answer {i}"}]}
            for i in range(n)]


def build(tiny_model, tmp_path, spec, *flags, template=None, cache="cache"):
    """build_dataset as a run does it (flags parsed and checked) -> (dataset, report, tokenizer, eval dataset)."""
    import datasets

    margs, dargs, targs, _ = ft.parse_args(["--model_name_or_path", tiny_model, "--data_path", spec,
                                           "--output_dir", str(tmp_path / "out"), *map(str, flags)])
    if template:
        margs.chat_template = str(template)
    fsrc.check_data_flags(dargs)
    tok = ft.load_tokenizer(margs, targs)
    path = Path(ft.build_dataset(dargs.data_path, tok, dargs, targs, str(tmp_path / cache)))
    report = json.loads((path / "report.json").read_text())
    held = datasets.load_from_disk(str(path / "eval")) if (path / "eval").is_dir() else None
    return datasets.load_from_disk(str(path / "data")), report, tok, held


def texts_of(tok, ds):
    return [tok.decode(ids) for ids in ds["input_ids"]]


def trained_texts(tok, ds):
    return [tok.decode([t for t in labels if t != ft.IGNORE_INDEX]) for labels in ds["labels"]]


# ------------------------------------------------------------------------------------------------
# Every file kind holds the same records as JSONL: the same tokens come out
# ------------------------------------------------------------------------------------------------


def test_parquet_arrow_csv_tsv_and_save_to_disk_give_the_tokens_jsonl_gives(tiny_model, tmp_path):
    import datasets
    import pyarrow.csv as pcsv

    rows = [{"instruction": f"Say {i}, \"quoted\", with a comma", "input": "" if i % 2 else f"ctx\nline {i}",
             "output": f"{i}, done"} for i in range(12)]
    jsonl = write_jsonl(tmp_path / "a.jsonl", rows)
    table = pa().Table.from_pylist(rows)
    files = {"parquet": write_parquet(tmp_path / "a.parquet", rows, row_group_size=5)}  # several row groups
    with pa().OSFile(str(tmp_path / "file.arrow"), "wb") as f, pa().ipc.new_file(f, table.schema) as w:
        w.write_table(table, max_chunksize=4)  # Arrow IPC file format, several batches
    with pa().OSFile(str(tmp_path / "stream.arrow"), "wb") as f, pa().ipc.new_stream(f, table.schema) as w:
        w.write_table(table, max_chunksize=4)  # the stream format, as datasets writes
    files.update(arrow_file=str(tmp_path / "file.arrow"), arrow_stream=str(tmp_path / "stream.arrow"))
    pcsv.write_csv(table, str(tmp_path / "a.csv"))  # quotes fields with commas, quotes and newlines
    files["csv"] = str(tmp_path / "a.csv")
    with open(tmp_path / "a.tsv", "w", newline="", encoding="utf-8-sig") as f:  # with a BOM, as Excel writes
        w = csv.writer(f, delimiter="\t")
        w.writerow(rows[0])
        w.writerows([r.values() for r in rows])
    files["tsv"] = str(tmp_path / "a.tsv")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    files["save_to_disk"] = str(tmp_path / "saved")
    reference, report, _, _ = build(tiny_model, tmp_path, jsonl)
    for kind, path in files.items():
        ds, report, _, _ = build(tiny_model, tmp_path, path)
        assert ds["input_ids"] == reference["input_ids"] and ds["labels"] == reference["labels"], kind
        assert report["samples"] == 12 and list(report["files"].values())[0]["format"] == "alpaca", kind
    # a plain folder mixes kinds, each file read by its own name, source = the file's sub-folder
    for kind in ("parquet", "csv"):
        os.makedirs(tmp_path / "mix" / kind)
        os.link(files[kind], tmp_path / "mix" / kind / Path(files[kind]).name)
    ds, report, _, _ = build(tiny_model, tmp_path, str(tmp_path / "mix"))
    assert report["samples_per_source"] == {"csv": 12, "parquet": 12}


def test_rows_are_named_file_row_n(tiny_model, tmp_path, monkeypatch, capsys):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(30)]
    rows[6]["completion"] = "  "  # row 7
    rows[20]["prompt"] = None  # row 21: a null cell
    path = write_parquet(tmp_path / "pc.parquet", rows, row_group_size=8)
    msg = user_error(dry_run_args(tiny_model, path, tmp_path), monkeypatch, capsys)
    assert f"{path}:row 7: completion: empty assistant reply" in msg
    assert f"{path}:row 21: prompt: missing or null" in msg
    assert not (tmp_path / "out").exists()
    _, report, _, _ = build(tiny_model, tmp_path, path, "--skip_invalid_records", "True")
    assert report["files"][path] == {"records": 30, "invalid": 2, "samples": 28, "truncated": 0, "dropped": 0,
                                     "format": "prompt_completion"}


# ------------------------------------------------------------------------------------------------
# TRL's formats: prompt/completion (strings, conversational), text
# ------------------------------------------------------------------------------------------------


def test_prompt_completion_strings_and_conversational(tiny_model, tmp_path):
    rows = [{"prompt": "What is 2+2?", "completion": "4", "system": "Be brief."},
            {"prompt": [{"role": "system", "content": "You count."}, {"role": "user", "content": "One?"},
                        {"role": "assistant", "content": "EARLIER"}, {"role": "user", "content": "Two?"}],
             "completion": [{"role": "assistant", "content": "Two."}]}]
    ds, report, tok, _ = build(tiny_model, tmp_path, write_jsonl(tmp_path / "pc.jsonl", rows))
    assert trained_texts(tok, ds) == ["4<|im_end|>", "Two.<|im_end|>"]  # the prompt's assistant turn is not trained
    text = tok.decode(ds[0]["input_ids"])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?")
    assert "EARLIER" in tok.decode(ds[1]["input_ids"])
    for record, expected in [({"prompt": "q"}, "completion: missing or null"),
                             ({"prompt": "q", "completion": [{"role": "user", "content": "x"}]},
                              "completion: no assistant turn"),
                             ({"prompt": 3, "completion": "a"}, "prompt: must be a string or a list of messages"),
                             ({"prompt": [{"role": "system", "content": "s"}], "completion": "a", "system": "t"},
                              "system: given twice")]:
        with pytest.raises(ft.RecordError, match=expected):
            fd.normalize_record(record, "prompt_completion")


def test_text_format_trains_every_token_with_eos_and_packs(tiny_model, tmp_path):
    texts = ["The quick brown fox jumps over the lazy dog.", "A second document.\nWith two lines.", "word " * 300]
    path = write_parquet(tmp_path / "corpus.parquet", [{"text": t} for t in texts])
    ds, report, tok, _ = build(tiny_model, tmp_path, path, "--model_max_length", "64", "--long_text", "cut")
    eos = tok.eos_token_id
    for row, text in zip(ds, texts):
        assert row["labels"] == row["input_ids"] and row["n_trained"] == row["length"] - 1
        if len(text) < 100:
            assert row["input_ids"] == tok(text)["input_ids"] + [eos]  # no chat template, EOS appended
    assert ds[2]["length"] == 64 and report["truncated"] == 1
    assert "<|im_start|>" not in tok.decode(ds[0]["input_ids"])
    for bad, expected in [({"text": ""}, "text: empty"), ({"text": 5}, "text: must be a string, got int")]:
        with pytest.raises(ft.RecordError, match=expected):
            fd.normalize_text(bad)
    # a .txt file named as an entry: one text per non-blank line
    (tmp_path / "wiki.txt").write_text("\ufeffFirst line.\n\n  \nSecond line.\n", encoding="utf-8")
    ds, report, tok, _ = build(tiny_model, tmp_path, str(tmp_path / "wiki.txt"))
    assert [tok.decode(ids) for ids in ds["input_ids"]] == ["First line.<|im_end|>", "Second line.<|im_end|>"]


# ------------------------------------------------------------------------------------------------
# --columns, and sources that fit no format
# ------------------------------------------------------------------------------------------------


def test_columns_map_names_and_a_misfit_says_what_it_found(tiny_model, tmp_path, monkeypatch, capsys):
    rows = [{"question": f"q{i}", "answer": f"a{i}", "id": i} for i in range(4)]
    path = write_parquet(tmp_path / "qa.parquet", rows)
    msg = user_error(dry_run_args(tiny_model, path, tmp_path), monkeypatch, capsys)
    assert f"{path}: columns 'question', 'answer', 'id' fit no format" in msg
    assert "--columns question=prompt,answer=completion" in msg
    ds, report, tok, _ = build(tiny_model, tmp_path, path, "--columns", "question=prompt,answer=completion")
    assert trained_texts(tok, ds) == [f"a{i}<|im_end|>" for i in range(4)]
    jsonl = write_jsonl(tmp_path / "conv.jsonl", [{"conversation": c["messages"]} for c in chats(3)])
    ds, _, tok, _ = build(tiny_model, tmp_path, jsonl, "--columns", "conversation=messages")
    assert len(ds) == 3
    msg = user_error(dry_run_args(tiny_model, jsonl, tmp_path), monkeypatch, capsys)
    assert f"{jsonl}:1: record: keys 'conversation' fit no format" in msg and "--columns conversation=messages" in msg
    # a mapping that names nothing, a collision, a key no format has
    msg = user_error(dry_run_args(tiny_model, jsonl, tmp_path, "--columns", "conversation=messages,dialog=system"),
                     monkeypatch, capsys)
    assert "--columns dialog=system: no data file has a column or key 'dialog' (found: conversation)" in msg
    both = write_parquet(tmp_path / "both.parquet", [{"q": "x", "prompt": "y", "completion": "z"}])
    msg = user_error(dry_run_args(tiny_model, both, tmp_path, "--columns", "q=prompt"), monkeypatch, capsys)
    assert "'q' and 'prompt' would both be 'prompt'" in msg
    msg = user_error(dry_run_args(tiny_model, both, tmp_path, "--columns", "q=promt"), monkeypatch, capsys)
    assert "--columns q=promt: 'promt' is not a key of a format or of a message (did you mean 'prompt'?)" in msg
    msg = user_error(dry_run_args(tiny_model, path, tmp_path, "--columns", "questoin=prompt,answer=completion"),
                     monkeypatch, capsys)
    assert "the mapping questoin=prompt names no column of this table" in msg
    # a column that extends a format key (prompt_id, as HuggingFaceH4 datasets have) is no typo
    ids = write_parquet(tmp_path / "ids.parquet", [{"prompt": "p", "prompt_id": "x1", "completion": "c"}])
    assert build(tiny_model, tmp_path, ids)[1]["samples"] == 1


# ------------------------------------------------------------------------------------------------
# Dataset folders: Hub repository layout, save_to_disk
# ------------------------------------------------------------------------------------------------


def make_hub_repo(root, configs=True):
    """A dataset repository as cloned from the Hub: data/ shards by split, or README.md configs (two subsets)."""
    root = Path(root)
    if configs:
        write_parquet(root / "en" / "train-00000-of-00001.parquet", chats(3, "en"))
        write_parquet(root / "fr" / "train.parquet", chats(2, "fr"))
        write_parquet(root / "fr" / "test.parquet", chats(1, "frtest"))
        (root / "README.md").write_text(
            "---\nlicense: mit\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n    path: en/train-*\n"
            "- config_name: fr\n  data_files:\n  - split: train\n    path: fr/train.parquet\n  - split: test\n"
            "    path: fr/test.parquet\n---\n# A card\n")
    else:
        write_parquet(root / "data" / "train-00000-of-00002.parquet", chats(3, "a"))
        write_parquet(root / "data" / "train-00001-of-00002.parquet", chats(2, "b"))
        write_parquet(root / "data" / "test-00000-of-00001.parquet", chats(1, "test"))
        (root / "README.md").write_text("# no YAML header\n")
    return str(root)


def test_hub_repository_folders_splits_and_subsets(tiny_model, tmp_path, monkeypatch, capsys):
    plain = make_hub_repo(tmp_path / "shards", configs=False)
    ds, report, tok, _ = build(tiny_model, tmp_path, plain)
    assert report["samples"] == 5 and report["samples_per_source"] == {"shards": 5}  # train only, both shards
    assert not any("test" in t for t in texts_of(tok, ds))
    assert build(tiny_model, tmp_path, f"{plain}[test]")[1]["samples"] == 1
    repo = make_hub_repo(tmp_path / "repo")
    msg = user_error(dry_run_args(tiny_model, repo, tmp_path), monkeypatch, capsys)
    assert f"{repo}: subsets en, fr and none is the default: choose one, e.g. {repo}[en:train]" in msg
    assert build(tiny_model, tmp_path, f"{repo}[en:train]")[1]["samples"] == 3
    assert build(tiny_model, tmp_path, f"{repo}[fr:]")[1]["samples"] == 2  # the subset's default split
    assert build(tiny_model, tmp_path, f"{repo}[fr:test]:2")[1]["samples"] == 2  # a ratio after the selection
    for select, expected in [("fr:tset", "no split 'tset' (did you mean 'test'?); splits: train, test"),
                             ("de:train", "no subset 'de'; subsets: en, fr"),
                             ("test", "subsets en, fr and none is the default")]:
        assert expected in user_error(dry_run_args(tiny_model, f"{repo}[{select}]", tmp_path), monkeypatch, capsys)
    # one default among several
    (Path(repo) / "README.md").write_text((Path(repo) / "README.md").read_text().replace(
        "- config_name: fr\n", "- config_name: fr\n  default: true\n"))
    assert build(tiny_model, tmp_path, repo, cache="c2")[1]["samples"] == 2
    # a selection on a plain file, a Hub folder inside a plain folder (read by its own layout)
    msg = user_error(dry_run_args(tiny_model, f"{write_jsonl(tmp_path / 'x.jsonl', chats(1))}[train]", tmp_path),
                     monkeypatch, capsys)
    assert "[train] selects a split of a dataset folder or Hub id" in msg
    write_jsonl(tmp_path / "all" / "own" / "a.jsonl", chats(2))
    os.symlink(plain, tmp_path / "all" / "hub")
    _, report, _, _ = build(tiny_model, tmp_path, str(tmp_path / "all"))
    assert report["samples_per_source"] == {"hub": 5, "own": 2}
    assert report["skipped_files"]["ignored"] == [str(tmp_path / "all" / "hub") + "[test]"]  # said, not read


def test_save_to_disk_dataset_and_dataset_dict(tiny_model, tmp_path, monkeypatch, capsys):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(chats(4)),
                               "validation": datasets.Dataset.from_list(chats(2, "v"))})
    dd.save_to_disk(str(tmp_path / "dd"))
    ds, report, _, _ = build(tiny_model, tmp_path, str(tmp_path / "dd"))
    assert report["samples"] == 4 and report["skipped_files"]["ignored"] == [str(tmp_path / "dd" / "validation")]
    assert build(tiny_model, tmp_path, f"{tmp_path / 'dd'}[validation]")[1]["samples"] == 2
    one = str(tmp_path / "dd" / "train")
    assert "holds one saved split (a Dataset, no dataset_dict.json); drop [train]" in user_error(
        dry_run_args(tiny_model, f"{one}[train]", tmp_path), monkeypatch, capsys)
    os.remove(os.path.join(one, "data-00000-of-00001.arrow"))
    assert "state.json lists" in user_error(dry_run_args(tiny_model, one, tmp_path), monkeypatch, capsys)


# ------------------------------------------------------------------------------------------------
# Hub dataset ids: offline, from a Hugging Face cache laid out as huggingface_hub does
# ------------------------------------------------------------------------------------------------


def make_hub_cache(cache, repo_id, revision="3f1c0ffee0ddba11"):
    """HF_HUB_CACHE/datasets--ORG--NAME/{refs/main, blobs/SHA, snapshots/REV/PATH -> ../../blobs/SHA}: what
    `huggingface-cli download --repo-type dataset ORG/NAME` (or datasets.load_dataset) leaves behind."""
    import hashlib

    repo = Path(cache) / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / revision
    files = {"data/train-00000-of-00001.parquet": [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)],
             "data/test-00000-of-00001.parquet": [{"prompt": "tp", "completion": "tc"}], "README.md": None}
    for name, rows in files.items():
        tmp = repo / "blobs" / "incoming"
        write_parquet(tmp, rows) if rows else tmp.write_text("---\nlicense: cc-by-4.0\n---\n")
        blob = repo / "blobs" / hashlib.sha256(tmp.read_bytes()).hexdigest()
        tmp.rename(blob)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snapshot / name).parent), snapshot / name)
    return snapshot


def test_hub_id_offline_from_the_cache(tiny_model, tmp_path):
    snapshot = make_hub_cache(tmp_path / "hub", "acme/chat-sft")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    out = tmp_path / "out"
    proc = run_finetune(["--model_name_or_path", tiny_model, "--data_path", "acme/chat-sft,acme/chat-sft[test]:3",
                         "--output_dir", out, "--dataset_cache_dir", tmp_path / "cache", "--dry_run", "True"], env=env)
    assert "acme/chat-sft: split 'train', 1 files (other splits: test)" in proc.stdout
    train = json.loads((out / "data_report.json").read_text())["train"]
    assert train["samples"] == 6 + 3 and train["samples_per_source"] == {"chat-sft": 9}
    assert str(snapshot / "data" / "train-00000-of-00001.parquet") in train["files"]
    proc = run_finetune(["--model_name_or_path", tiny_model, "--data_path", "acme/no-such-set", "--output_dir",
                         tmp_path / "out2", "--dataset_cache_dir", tmp_path / "cache"], env=env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout
    assert ("[finetune] error: --data_path acme/no-such-set: no such file or folder, and no dataset 'acme/no-such-set' "
            f"in the Hugging Face cache ({tmp_path / 'hub'} or {tmp_path / 'datasets-cache'}); "
            "offline (HF_HUB_OFFLINE=1)") in proc.stdout
    assert not (tmp_path / "out2").exists()


# ------------------------------------------------------------------------------------------------
# LLaMA-Factory's data folder: dataset_info.json
# ------------------------------------------------------------------------------------------------


def make_llamafactory_dir(root):
    """LLaMA-Factory's data/ as its users keep it: its own demo files and entries as in its dataset_info.json,
    plus a folder entry, a tags entry, a pretraining (text) entry, a preference entry and a wrong file name."""
    root = Path(root)
    root.mkdir()
    for name in ("alpaca_en_demo.json", "identity.json", "glaive_toolcall_en_demo.json"):
        os.symlink(DATA / name, root / name)
    write_parquet(root / "my_qa" / "part-0.parquet",
                  [{"q": f"q{i}", "a": f"a{i}", "sys": "Be kind."} for i in range(3)])
    write_jsonl(root / "openai_chat.jsonl", [{"conv": [{"role": "user", "content": f"u{i}"},
                                                       {"role": "assistant", "content": f"r{i}"}]} for i in range(2)])
    write_jsonl(root / "c4_demo.jsonl", [{"text": f"Raw text {i}."} for i in range(4)])
    write_jsonl(root / "with_system.jsonl", [{"instruction": "i", "output": "o", "system": "NOT MAPPED"}])
    info = {
        "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
        "identity": {"file_name": "identity.json"},
        "glaive_toolcall_en_demo": {"file_name": "glaive_toolcall_en_demo.json", "formatting": "sharegpt",
                                    "columns": {"messages": "conversations", "tools": "tools"}},
        "my_qa": {"file_name": "my_qa", "columns": {"prompt": "q", "response": "a", "system": "sys"}, "num_samples": 5},
        "role_content": {"file_name": "openai_chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "conv"},
                         "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                  "assistant_tag": "assistant"}},
        "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
        "with_system": {"file_name": "with_system.jsonl"},  # LLaMA-Factory reads `system` only when mapped
        "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt",
                        "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "typo": {"file_name": "alpaca_en_dmeo.json"},
    }
    (root / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return str(root)


def test_llamafactory_dataset_info(tiny_model, tmp_path, monkeypatch, capsys):
    lf = make_llamafactory_dir(tmp_path / "data")
    ds, report, tok, _ = build(tiny_model, tmp_path, "", "--dataset_dir", lf, "--dataset",
                               "alpaca_en_demo:0.1,identity,glaive_toolcall_en_demo:0.02,my_qa,role_content,c4_demo,with_system",
                               "--model_max_length", "4096")
    assert report["samples_per_source"] == {"alpaca_en_demo": 100, "identity": 91, "glaive_toolcall_en_demo": 6,
                                            "my_qa": 5, "role_content": 2, "c4_demo": 4, "with_system": 1}
    formats = {Path(f).name: s["format"] for f, s in report["files"].items()}
    assert formats == {"alpaca_en_demo.json": "alpaca", "identity.json": "alpaca", "glaive_toolcall_en_demo.json":
                       "sharegpt", "part-0.parquet": "alpaca", "openai_chat.jsonl": "sharegpt", "c4_demo.jsonl": "text",
                       "with_system.jsonl": "alpaca"}
    texts = texts_of(tok, ds)
    assert any(t.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nq0") for t in texts)
    assert "Raw text 0.<|im_end|>" in texts  # LLaMA-Factory's pretraining entry (prompt only): the text format
    assert not any("NOT MAPPED" in t for t in texts)
    lf_flags = ["--dataset_dir", lf, "--dataset"]
    cases = [("dpo_en_demo", "--dataset dpo_en_demo: " + lf + "/dataset_info.json describes preference data "
              "(ranking: true), not supervised fine-tuning data"),
             ("alpaca_demo", "--dataset alpaca_demo: no such entry in " + lf + "/dataset_info.json (did you mean "
              "'alpaca_en_demo'?); its SFT entries include: alpaca_en_demo, c4_demo, glaive_toolcall_en_demo, ... "
              "(8 in all)."),
             ("typo", "--dataset typo: file_name 'alpaca_en_dmeo.json' in " + lf + "/dataset_info.json does not "
              "exist in " + lf + " (did you mean 'alpaca_en_demo.json'?)")]
    for name, expected in cases:
        argv = ["--model_name_or_path", tiny_model, *lf_flags, name, "--output_dir", tmp_path / "o",
                "--dataset_cache_dir", tmp_path / "c", "--dry_run", "True"]
        assert expected in user_error(argv, monkeypatch, capsys)
    msg = user_error(dry_run_args(tiny_model, lf, tmp_path), monkeypatch, capsys)
    assert f"--data_path {lf}: LLaMA-Factory's data folder" in msg and f"--dataset_dir {lf} --dataset NAME" in msg
    msg = user_error(["--model_name_or_path", tiny_model, "--dataset_dir", tmp_path, "--dataset", "x",
                      "--output_dir", tmp_path / "o"], monkeypatch, capsys)
    assert f"--dataset: {tmp_path}/dataset_info.json does not exist" in msg


# ------------------------------------------------------------------------------------------------
# --val_size
# ------------------------------------------------------------------------------------------------


def test_val_size_holds_out_per_source_the_same_for_a_seed(tiny_model, tmp_path, monkeypatch, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", chats(40, "a"))
    b = write_parquet(tmp_path / "b.parquet", chats(10, "b"))
    ds, report, tok, held = build(tiny_model, tmp_path, f"{a},{b}:2", "--val_size", "0.2")
    assert report["held_out"] == {"val_size": 0.2, "samples": 10, "samples_per_source": {"a": 8, "b": 2}}
    assert report["samples_per_source"] == {"a": 32, "b": 16} and len(held) == 10  # the ratio after the hold-out
    train_texts, held_texts = set(texts_of(tok, ds)), set(texts_of(tok, held))
    assert not train_texts & held_texts and len(held_texts) == 10
    again = build(tiny_model, tmp_path, f"{a},{b}:2", "--val_size", "0.2", cache="c2")[3]
    other = build(tiny_model, tmp_path, f"{a},{b}:2", "--val_size", "0.2", "--seed", "7", cache="c3")[3]
    assert again["input_ids"] == held["input_ids"] and other["input_ids"] != held["input_ids"]
    assert build(tiny_model, tmp_path, a, "--val_size", "5")[1]["held_out"]["samples"] == 5
    for flags, expected in [(["--val_size", "0.2", "--eval_data_path", b], "use one of them"),
                            (["--val_size", "2.5"], "--val_size 2.5: a share of the training samples"),
                            (["--val_size", "0.001"], "--val_size 0.001 holds out no sample of 40"),
                            (["--val_size", "40"], "would hold out 40 of 40 samples")]:
        assert expected in user_error(dry_run_args(tiny_model, a, tmp_path, *flags), monkeypatch, capsys)


# ------------------------------------------------------------------------------------------------
# --chat_template_kwargs
# ------------------------------------------------------------------------------------------------


def test_chat_template_kwargs_render_the_data_and_reach_chat_py(tiny_model, tmp_path, monkeypatch, capsys):
    import chat

    path = write_jsonl(tmp_path / "a.jsonl", chats(2))
    plain, _, tok, _ = build(tiny_model, tmp_path, path, template=GRANITE)
    thinking, report, _, _ = build(tiny_model, tmp_path, path, "--chat_template_kwargs", '{"thinking": true}',
                                   template=GRANITE)
    assert "Write your thoughts between <think></think>" in tok.decode(thinking[0]["input_ids"])
    assert "Write your thoughts" not in tok.decode(plain[0]["input_ids"])
    assert trained_texts(tok, thinking) == trained_texts(tok, plain)  # the masking rule holds: the answers only
    assert len(os.listdir(tmp_path / "cache")) == 2  # part of the cache key
    for value, expected in [('{"thinking": tru}', "--chat_template_kwargs is not valid JSON"),
                            ('["thinking"]', "--chat_template_kwargs must be a JSON object")]:
        assert expected in user_error(dry_run_args(tiny_model, path, tmp_path, "--chat_template_kwargs", value),
                                      monkeypatch, capsys)
    # the dry run stores them; chat.py renders prompts with them (its flag overrides)
    run_main(dry_run_args(tiny_model, path, tmp_path, "--chat_template_kwargs", '{"enable_thinking": false}'),
             monkeypatch, capsys)
    assert json.loads((tmp_path / "out" / "data_report.json").read_text())["chat_template_kwargs"] == {
        "enable_thinking": False}
    assert chat.template_kwargs(chat.parse_args(["--model", str(tmp_path / "out")])) == {"enable_thinking": False}
    assert chat.template_kwargs(chat.parse_args(["--model", str(tmp_path / "out"), "--chat_template_kwargs",
                                                 '{"thinking": true}'])) == {"thinking": True}
    model, tok = chat.load(tiny_model, device="cpu")
    tok.chat_template = GRANITE.read_text()
    assert isinstance(chat.generate(model, tok, [{"role": "user", "content": "hi"}], max_new_tokens=2,
                                    kwargs={"thinking": True}), str)


# ------------------------------------------------------------------------------------------------
# Hostile files
# ------------------------------------------------------------------------------------------------


def test_nested_and_null_parquet_columns(tiny_model, tmp_path):
    """Arrow structs have every key of every row: absent keys read as null and must not reach the template
    (tool_calls: null, train: null); tool-call arguments as structs lose their null fields; a list given as
    JSON text in a string column is parsed."""
    rows = [{"messages": [{"role": "user", "content": "Weather?"},
                          {"role": "assistant", "content": None, "tool_calls": [
                              {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
                          {"role": "tool", "content": "21C"}, {"role": "assistant", "content": "It is 21C."}],
             "tools": None},
            {"messages": [{"role": "user", "content": "Day?"}, {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "date", "arguments": {"tz": "UTC"}}}]},
                {"role": "tool", "content": "Monday"}, {"role": "assistant", "content": "Monday.", "train": False},
                {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}], "tools": None}]
    path = write_parquet(tmp_path / "nested.parquet", rows)
    import pyarrow.parquet as pq

    assert "city: string, tz: string" in str(pq.read_schema(path).field("messages").type)  # the union of keys
    ds, report, tok, _ = build(tiny_model, tmp_path, path)
    assert report["samples"] == 2 and report["invalid"] == {}
    assert "None" not in "".join(texts_of(tok, ds))
    assert "Monday." not in "".join(trained_texts(tok, ds))  # train: false survived, the nulls beside it did not
    as_text = write_parquet(tmp_path / "text.parquet", [{"messages": json.dumps(chats(1)[0]["messages"])},
                                                         {"messages": "[{broken"}])
    ds, report, _, _ = build(tiny_model, tmp_path, as_text, "--skip_invalid_records", "True")
    assert report["samples"] == 1 and report["invalid"] == {"messages: text that is not a JSON list": 1}


def test_wrong_types_empty_tables_and_broken_files_are_one_line(tiny_model, tmp_path, monkeypatch, capsys):
    import datasets

    write_parquet(tmp_path / "int.parquet", [{"prompt": "q", "completion": 5}])
    write_parquet(tmp_path / "struct.parquet", [{"instruction": {"a": 1}, "output": "o"}])
    write_parquet(tmp_path / "nulls.parquet", [{"text": None}, {"text": None}])
    import pyarrow.parquet as pq

    pq.write_table(pa().table({"prompt": pa().array([], pa().string()), "completion": pa().array([], pa().string())}),
                   str(tmp_path / "empty.parquet"))
    (tmp_path / "trunc.parquet").write_bytes((tmp_path / "int.parquet").read_bytes()[:40])
    (tmp_path / "json.parquet").write_text(json.dumps(chats(1)[0]))
    datasets.Dataset.from_list(chats(2)).select([]).save_to_disk(str(tmp_path / "empty_split"))
    pq.write_table(pa().Table.from_arrays([pa().array(["q"]), pa().array(["a"]), pa().array(["x"])],
                                          names=["prompt", "completion", "prompt"]), str(tmp_path / "twice.parquet"))
    cases = {
        "int.parquet": "column 'completion' holds int64, but the 'completion' of a record must be text or a list",
        "struct.parquet": "column 'instruction' holds struct<a: int64>, but the 'instruction' of a record must be text",
        "nulls.parquet": "column 'text' is null in every row: no text",
        "empty.parquet": "no records (an empty table)",
        "trunc.parquet": "not a readable Parquet file",
        "json.parquet": "not a readable Parquet file",
        "empty_split": "no records (an empty table)",
        "twice.parquet": "the column 'prompt' appears twice",
    }
    for name, expected in cases.items():
        msg = user_error(dry_run_args(tiny_model, tmp_path / name, tmp_path), monkeypatch, capsys)
        assert expected in msg and msg.count("\n") <= 2, (name, msg)
    assert not (tmp_path / "out").exists()


def test_csv_quotes_bom_ragged_lines_and_encodings(tiny_model, tmp_path, monkeypatch, capsys):
    good = '\ufeffinstruction,output\n"Say ""hi"", twice","hi,\nhi"\n\nplain,answer\n'
    (tmp_path / "good.csv").write_text(good, encoding="utf-8")
    ds, report, tok, _ = build(tiny_model, tmp_path, str(tmp_path / "good.csv"))
    assert trained_texts(tok, ds) == ["hi,\nhi<|im_end|>", "answer<|im_end|>"]
    assert 'Say "hi", twice' in tok.decode(ds[0]["input_ids"])
    (tmp_path / "ragged.csv").write_text("instruction,output\na,b\nc,d,e\nf\ng,h\n")
    msg = user_error(dry_run_args(tiny_model, tmp_path / "ragged.csv", tmp_path), monkeypatch, capsys)
    assert f"{tmp_path / 'ragged.csv'}:row 2: csv: 3 fields where the header has 2 (line 3;" in msg
    assert f"{tmp_path / 'ragged.csv'}:row 3: csv: 1 fields where the header has 2 (line 4;" in msg
    for content, expected in [('instruction,output\n"open,never closed\n', ":2: not valid CSV"),
                              ("instruction,instruction\na,b\n", "the header names 'instruction' twice"),
                              ("", "empty file: no header"),
                              ("question,answer\nq,a\n", "columns 'question', 'answer' fit no format"),
                              ("instruction;output\nq;a\n", "the fields seem separated by ';', not ','"),
                              ("instruction,output\n", "no records (an empty table)")]:
        (tmp_path / "bad.csv").write_text(content)
        assert expected in user_error(dry_run_args(tiny_model, tmp_path / "bad.csv", tmp_path), monkeypatch, capsys)
    (tmp_path / "latin.csv").write_bytes("instruction,output\ncaf\u00e9,ok\n".encode("latin-1"))
    assert "latin.csv:2: not valid UTF-8" in user_error(dry_run_args(tiny_model, tmp_path / "latin.csv", tmp_path),
                                                        monkeypatch, capsys)
    (tmp_path / "u16.csv").write_bytes("instruction,output\nq,a\n".encode("utf-16"))
    assert "text encoded as UTF-16, not UTF-8" in user_error(dry_run_args(tiny_model, tmp_path / "u16.csv", tmp_path),
                                                             monkeypatch, capsys)


def test_utf8_jsonl_with_stray_nul_bytes_names_the_lines(tmp_path):
    lines = [json.dumps(c) for c in chats(6)]
    damaged = lines[:2] + [lines[2][:20] + "\x00" + lines[2][20:]] + lines[3:]
    (tmp_path / "nul.jsonl").write_bytes(("\n".join(damaged) + "\n").encode() + b"\x00" * 5000)  # crash tail
    got = [(line, str(r) if isinstance(r, fd.RecordError) else "ok") for line, r in fd.read_json_records(
        str(tmp_path / "nul.jsonl"))]
    assert got[2] == (3, "json: NUL bytes (\\x00) inside the record: a damaged line; fix or remove it")
    assert got[-1][0] == 7 and got[-1][1].startswith("json: 5000 NUL bytes and nothing else: this part of the file "
                                                     "was never written")
    assert [r for _, r in got].count("ok") == 5
    # a NUL-filled start (a pre-allocated file) is not UTF-16 either; a JSON array names the line too
    (tmp_path / "zeros.jsonl").write_bytes(b"\x00" * 8192 + b"\n" + lines[0].encode() + b"\n")
    assert [line for line, r in fd.read_json_records(str(tmp_path / "zeros.jsonl")) if isinstance(r, dict)] == [2]
    (tmp_path / "a.json").write_text(json.dumps(chats(3), indent=1) + "\x00" * 100)
    with pytest.raises(fd.DataError, match=r"a.json:\d+: 100 NUL bytes and nothing else.*after the JSON array"):
        list(fd.read_json_records(str(tmp_path / "a.json")))
    (tmp_path / "b.json").write_text(json.dumps(chats(3), indent=1).replace("q1 asks", "q1\\u0000 asks", 1)
                                     .replace("answer 2", "answer\x002", 1))
    got = [(line, str(r)) for line, r in fd.read_json_records(str(tmp_path / "b.json"))
           if isinstance(r, fd.RecordError)]
    assert len(got) == 1 and "NUL bytes (\\x00) inside the record" in got[0][1]


# ------------------------------------------------------------------------------------------------
# The cache key covers the new sources and settings
# ------------------------------------------------------------------------------------------------


def test_cache_key_covers_tables_columns_and_entry_options(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    path = write_parquet(tmp_path / "qa.parquet", [{"q": "x", "a": "y"}])
    tok = AutoTokenizer.from_pretrained(tiny_model)

    def key(*flags):
        margs, dargs, targs, _ = ft.parse_args(["--model_name_or_path", tiny_model, "--data_path", path,
                                               "--output_dir", str(tmp_path / "o"), *flags])
        fsrc.check_data_flags(dargs)
        return finetune_cache.cache_key(fsrc.resolve_data_spec(path, dargs.column_map)[0], tok, dargs, targs)

    base = key("--columns", "q=prompt,a=completion")
    assert key("--columns", "q=instruction,a=output") != base
    assert key("--columns", "q=prompt,a=completion", "--val_size", "0.5") != base
    assert key("--columns", "q=prompt,a=completion", "--chat_template_kwargs", '{"x": 1}') != base
    write_parquet(path, [{"q": "x", "a": "z"}])  # the file rewritten
    assert key("--columns", "q=prompt,a=completion") != base


# ------------------------------------------------------------------------------------------------
# Real training runs
# ------------------------------------------------------------------------------------------------


def test_training_on_text_with_packing_and_a_held_out_split(tiny_model, tmp_path):
    write_parquet(tmp_path / "corpus" / "part-0.parquet",
                  [{"text": f"Document {i}: " + "some words of text " * (i % 5 + 1)} for i in range(40)])
    pc = write_parquet(tmp_path / "pc.parquet", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)])
    out = tmp_path / "out"
    proc = run_finetune(["--model_name_or_path", tiny_model, "--data_path", f"{tmp_path / 'corpus'},{pc}",
                         "--val_size", "0.25", "--packing", "true", "--output_dir", out, "--dataset_cache_dir",
                         tmp_path / "cache", "--max_steps", "3", "--per_device_train_batch_size", "4",
                         "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "3",
                         "--save_strategy", "no"])
    assert "eval: 15 samples held out from the training data (--val_size 0.25), per source {'corpus': 10, 'pc': 5}" \
        in proc.stdout
    history = read_log_history(out)
    assert len([h for h in history if "loss" in h]) == 3
    evals = [h for h in history if "eval_loss" in h]
    assert evals and {"eval_loss_corpus", "eval_loss_pc"} <= set(evals[0])
    report = json.loads((out / "data_report.json").read_text())
    assert report["batching"] == "packing" and report["eval"]["samples"] == 15

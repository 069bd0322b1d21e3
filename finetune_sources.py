"""Where the training data comes from, for finetune.py: what a --data_path entry names, resolved to local data
files that finetune_data.py reads (JSON/JSONL, Parquet, Arrow, CSV/TSV). An entry is a file; a folder (all data
files below it; laid out as a Hugging Face dataset repository, or written by save_to_disk, it is read as such); a
Hub dataset id; or an entry of LLaMA-Factory's dataset_info.json (--dataset_dir/--dataset).

    ENTRY  = PATH | ORG/NAME                  a local file or folder; else a Hub dataset id
             then [SPLIT] or [SUBSET:SPLIT]   a split (and subset) of a dataset folder or id; of a LLaMA-Factory
                                              dataset_info.json: [NAME], its entry NAME
             then :RATIO                      sample the entry (0.5: a random half; 2: twice)
    A text that exists as a path is that path, whatever it contains ('run:3/', 'a[1].jsonl').

How a dataset folder or id is read is datasets' own resolution (README.md `configs`, default config, split names
from file names: datasets.data_files); the files are then read here, each with its own row numbers, so a bad row
is named `file:row N` and nothing is converted or copied first. A Hub id is read from the local Hugging Face cache
when offline (HF_HUB_OFFLINE=1), else its README and the chosen split's files are downloaded into that cache.

Interface: resolve_data_spec(spec, columns) -> ([Entry], skipped); parse_data_spec(spec) -> [(entry, ratio)];
list_data_files(folder); dataset_spec(dataset_dir, names) -> the --data_path entries that --dataset names;
check_data_flags(data_args); file_id.
"""

import json
import math
import os
import re
from typing import NamedTuple

from finetune_console import log0, suggest
from finetune_data import (
    DATA_SUFFIXES,
    MESSAGE_KEYS,
    READ_SUFFIXES,
    RECORD_KEYS,
    DataError,
    file_kind,
    parse_placeholders,
)
from finetune_template import parse_template_kwargs


class Entry(NamedTuple):
    """One --data_path entry: as written (without its ratio), its ratio, the [(file, source)] it reads, and how
    to read them (options: format, columns, only, tags, delimiter, num_samples, label: all JSON, in the cache key)."""
    path: str
    ratio: float
    files: list
    options: dict


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
SELECTION = re.compile(r"(.+?)\[([^\[\]]*)\]")
# Files datasets itself never reads as data in a dataset folder (datasets.data_files.FILES_TO_IGNORE) and save_to_disk's
METADATA_FILES = ("README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dataset_dict.json",
                  "state.json")
LLAMAFACTORY_SOURCES = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


def file_id(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def is_hub_id(name):
    """'org/name' that is not a path: no leading '/', '.', '~', and not a file name (a typo'd path stays a path)."""
    return bool(HUB_ID.fullmatch(name)) and not name.lower().endswith(READ_SUFFIXES)


def split_selection(item):
    """'x[train]' -> ('x', 'train'); 'x' -> ('x', None). Not for a text that exists as a path."""
    m = SELECTION.fullmatch(item)
    return (m.group(1), m.group(2)) if m and not os.path.exists(item) else (item, None)


def _names_something(item):
    base, _ = split_selection(item)
    return os.path.exists(item) or os.path.exists(base) or is_hub_id(base)


def parse_data_spec(spec):
    """'a.jsonl:0.5,dir/,org/name[test]' -> [(entry, ratio)]. Commas separate entries ('\\,' is a comma inside a
    name); a trailing ':RATIO' is a ratio only if the entry as written is not an existing path (so 'run:3/' works).
    Entries that name nothing (no such path, and not a Hub id) are errors here; Hub ids are looked up later."""
    entries = []
    for item in re.split(r"(?<!\\),", spec):
        item = os.path.expanduser(item.replace("\\,", ",").strip())
        if not item:
            continue
        path, ratio, tail = item, 1.0, None
        head, sep, tail = item.rpartition(":")
        if sep and head and not os.path.exists(item):
            try:
                path, ratio = head, float(tail)
            except ValueError:
                if not _names_something(item):
                    raise FileNotFoundError(
                        f"--data_path: {head} exists, but {tail!r} after ':' is not a ratio (ENTRY:RATIO, e.g. "
                        f"{head}:0.5)" if os.path.exists(head) else
                        f"--data_path: {item} does not exist (a ',' inside a name is written '\\,')") from None
        if not _names_something(path):
            raise FileNotFoundError(f"--data_path: {path} does not exist "
                                    "(entries are separated by ','; a ',' inside a name is written '\\,')")
        if not (math.isfinite(ratio) and 0 < ratio <= 1000):
            raise ValueError(f"--data_path: ratio of {path} must be a number > 0 and <= 1000, got {tail!r}.")
        entries.append((path, ratio))
    if not entries:
        raise ValueError(f"--data_path '{spec}' names no file.")
    return entries


def _save_to_disk_kind(folder):
    names = set(os.listdir(folder))
    if "dataset_dict.json" in names:
        return "dict"
    return "dataset" if {"state.json", "dataset_info.json"} <= names else None


def list_data_files(path):
    """A file -> [(file, source)]; a folder -> its data files, recursively, following symbolic links to folders (a
    link to a folder that contains it is an error); source = the first-level sub-folder (one per task) or the
    folder's own name. A sub-folder written by save_to_disk or laid out as a dataset repository is read as such
    (its default split). Also returns what was
    not read, to be said once in the log and report: hidden files and folders (.ipynb_checkpoints/, .git/, ...),
    metadata (README.md, dataset_info.json, ...) and files of other types."""
    skipped = {"hidden": [], "ignored": []}
    if not os.path.isdir(path):
        name = os.path.basename(path)
        for suffix in READ_SUFFIXES:
            name = name[: -len(suffix)] if name.lower().endswith(suffix) else name
        return [(path, name)], skipped
    root = os.path.normpath(path)
    files = []

    def source_of(folder):
        rel = os.path.relpath(folder, root)
        return os.path.basename(root) if rel == "." else rel.split(os.sep)[0]

    def walk(folder, ancestors):
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            raise ValueError(f"--data_path: cannot read folder {folder}: {e.strerror}") from None
        if folder != root and (_save_to_disk_kind(folder) or is_hub_folder(folder)):  # read as what it is
            found, _, skip = dataset_folder_files(folder, None, folder)
            files.extend((f, source_of(folder)) for f, _ in found)
            skipped["ignored"].extend(skip["ignored"])
            return
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
                what = "a broken symbolic link (or a loop of links)" if os.path.islink(full) else "not a regular file"
                raise ValueError(f"--data_path: {full} is {what}; remove it or fix the link.")
            elif name.lower().endswith(DATA_SUFFIXES) and name not in METADATA_FILES:
                files.append((full, source_of(folder)))
            else:
                skipped["ignored"].append(full)

    walk(root, {file_id(root)})
    if not files:
        hidden = f" (skipped hidden: {', '.join(skipped['hidden'][:3])})" if skipped["hidden"] else ""
        ignored = f" (ignored: {', '.join(skipped['ignored'][:3])})" if skipped["ignored"] else ""
        raise FileNotFoundError(f"--data_path: folder {path} has no {'/'.join(DATA_SUFFIXES)} files{hidden}{ignored}.")
    return files, skipped


# ---------------------------------------------------------------------------------------------
# Dataset folders: save_to_disk, Hugging Face dataset repositories, Hub ids
# ---------------------------------------------------------------------------------------------


def _choose(kind, names, asked, label, example):
    """The split (or subset) to read: the one asked for, else 'train', else the only one."""
    if asked is not None:
        if asked not in names:
            raise DataError(f"{label}: no {kind} {asked!r}{suggest(asked, names)}; {kind}s: {', '.join(names)}.")
        return asked
    if kind == "split" and "train" in names:
        return "train"
    if len(names) == 1:
        return names[0]
    raise DataError(f"{label}: {kind}s {', '.join(names)} and none is {'train' if kind == 'split' else 'the default'}: "
                    f"choose one, e.g. {example.format(names[0])}")


def _selection(select):
    """'' / None -> (None, None); 'test' -> (None, 'test'); 'sub:test' -> ('sub', 'test'); 'sub:' -> ('sub', None)."""
    if not select:
        return None, None
    subset, sep, split = select.rpartition(":")
    return (subset or None, split or None) if sep else (None, split)


def saved_dataset_files(folder, select, label):
    """A folder written by Dataset.save_to_disk (state.json lists its Arrow files) or DatasetDict.save_to_disk
    (dataset_dict.json lists the splits, one sub-folder each) -> (Arrow files in order, the other splits' folders)."""
    subset, split = _selection(select)
    others = []
    if subset is not None:
        raise DataError(f"{label}: a save_to_disk folder has no subsets; select a split with [SPLIT].")
    if _save_to_disk_kind(folder) == "dict":
        with open(os.path.join(folder, "dataset_dict.json"), encoding="utf-8") as f:
            splits = list(json.load(f).get("splits") or [])
        split = _choose("split", splits, split, label, f"{folder}[{{}}]")
        others = [os.path.join(folder, s) for s in splits if s != split]
        folder = os.path.join(folder, split)
    elif split is not None:
        raise DataError(f"{label}: {folder} holds one saved split (a Dataset, no dataset_dict.json); drop [{split}].")
    try:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
            files = [os.path.join(folder, d["filename"]) for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{folder}/state.json: not a readable save_to_disk state ({type(e).__name__}: {e}); "
                        "save the dataset again.") from None
    if not files:
        raise DataError(f"{label}: no records (an empty table), the saved split has no rows.")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise DataError(f"{folder}: state.json lists {', '.join(missing)}, not there; save the dataset again (copy "
                        "every data-*.arrow file).")
    return files, others


def card_metadata(readme):
    """The YAML header of a dataset card (README.md), as a dict ({} without one)."""
    try:
        with open(readme, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return {}
    m = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", text, re.S)
    if not m:
        return {}
    import yaml

    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as e:
        raise DataError(f"{readme}: the YAML header is not valid YAML ({' '.join(str(e).split())})") from None
    return data if isinstance(data, dict) else {}


def is_hub_folder(folder):
    """Laid out as a Hugging Face dataset repository: a data/ folder, or a dataset card declaring configs/splits."""
    meta = card_metadata(os.path.join(folder, "README.md"))
    return os.path.isdir(os.path.join(folder, "data")) or "configs" in meta or "dataset_info" in meta


def hub_folder_files(base, select, label, readme=None):
    """The files of one subset and split of a dataset repository, by datasets' own rules: the README.md `configs`
    (data_files, data_dir, default) or, without configs, split names in file names (data/train-00000-of-00001.parquet,
    test.csv, ...). base: a local folder or hf://datasets/ORG/NAME. -> (files, options, the other splits, as the
    entries that would read them)."""
    from datasets.data_files import get_data_patterns, resolve_pattern, sanitize_patterns
    from datasets.utils.metadata import MetadataConfigs

    subset, split = _selection(select)
    bare = SELECTION.sub(r"\1", label) if SELECTION.fullmatch(label) else label
    meta = card_metadata(readme or os.path.join(base, "README.md"))
    try:
        configs = MetadataConfigs.from_dataset_card_data(meta)
    except Exception as e:  # ValueError for bad data_files; features that do not parse raise others
        raise DataError(f"{readme or base + '/README.md'}: its `configs` are not valid: "
                        f"{' '.join(str(e).split())[:300]}") from None
    root, patterns, options = base, None, {}
    if configs:
        names = list(configs)
        try:
            default = configs.get_default_config_name()
        except ValueError as e:
            raise DataError(f"{label}: {e}") from None
        subset = _choose("subset", names, subset if subset is not None else default, label, f"{bare}[{{}}:train]")
        params = configs[subset]
        root = f"{base}/{params['data_dir']}" if params.get("data_dir") else base
        patterns = sanitize_patterns(params["data_files"]) if params.get("data_files") else None
        sep = params.get("sep", params.get("delimiter"))
        if isinstance(sep, str) and len(sep) == 1:
            options["delimiter"] = sep
    elif subset is not None:
        raise DataError(f"{label}: subset {subset!r} asked for, but the dataset defines no subsets (no `configs` in "
                        "its README.md); select a split with [SPLIT].")
    if patterns is None:
        try:
            patterns = get_data_patterns(root)
        except Exception as e:  # EmptyDatasetError, FileNotFoundError: nothing datasets recognises as data
            if root.startswith("hf://") and not isinstance(e, FileNotFoundError):
                raise  # the network: hub_id_files says it, or reads the cached snapshot
            raise DataError(f"{label}: no data files in {root} ({type(e).__name__})") from None
    split = _choose("split", list(patterns), split, label, f"{bare}[{{}}]" if not configs else f"{bare}[{subset}:{{}}]")
    files = []
    for pattern in patterns[split]:
        try:
            files += [f for f in resolve_pattern(pattern, root) if f not in files]
        except FileNotFoundError:
            pass
    if not files:
        raise DataError(f"{label}: split {split!r} ({', '.join(map(str, patterns[split]))}) matches no file "
                        f"under {root}.")
    where = f"subset {subset!r}, " if configs else ""
    log0(f"data: {label}: {where}split {split!r}, {len(files)} files" +
         (f" (other splits: {', '.join(s for s in patterns if s != split)})" if len(patterns) > 1 else ""))
    return files, options, [f"{bare}[{subset}:{s}]" if configs else f"{bare}[{s}]" for s in patterns if s != split]


def _one_kind(files, label):
    """The files of the most common data kind (datasets reads a split with one builder; parquet wins ties), and
    the rest, which are not read."""
    kinds = {}
    for f in files:
        kinds.setdefault(file_kind(f), []).append(f)
    kinds.pop(None, None)
    if not kinds:
        raise DataError(f"{label}: none of its {len(files)} files is a data file finetune reads "
                        f"({', '.join(READ_SUFFIXES)}): {', '.join(files[:3])}")
    order = ("parquet", "arrow", "json", "csv", "tsv", "txt")
    kind = max(kinds, key=lambda k: (len(kinds[k]), -order.index(k)))
    return kinds[kind], [f for f in files if f not in kinds[kind]]


def _offline():
    import huggingface_hub.constants as hc

    return bool(hc.HF_HUB_OFFLINE) or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_id_files(repo, select, label):
    """A Hub dataset id -> (local files, options, skipped). Offline, from the local Hugging Face cache
    (HF_HUB_CACHE: a snapshot folder is read like a cloned repository); online, the README and the chosen split's
    files are downloaded into that cache (if the Hub cannot be reached, the cached snapshot is used)."""
    import huggingface_hub as hh

    snapshot, caches = None, [hh.constants.HF_HUB_CACHE]
    if os.environ.get("HF_DATASETS_CACHE"):  # a snapshot kept there (not datasets' own Arrow copies) is found too
        caches.append(os.environ["HF_DATASETS_CACHE"])
    for cache_dir in caches:
        try:
            snapshot = snapshot or hh.snapshot_download(repo, repo_type="dataset", cache_dir=cache_dir,
                                                        local_files_only=True)
        except Exception:  # LocalEntryNotFoundError (not cached), or a broken cache entry
            pass
    cache, entry = " or ".join(caches), label if label.startswith("--") else f"--data_path {label}"
    if not _offline():
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

        try:
            return _download_split(repo, select, label)
        except Exception as e:  # no network, a proxy, a gated dataset without a token: say it, or use the cache
            if isinstance(e, (DataError, FileNotFoundError)) and not isinstance(e, LocalEntryNotFoundError):
                raise  # the dataset's own problem
            if snapshot is None and isinstance(e, RepositoryNotFoundError):
                raise FileNotFoundError(f"{entry}: no such file or folder, and no dataset {repo!r} on the Hugging "
                                        "Face Hub (or it is private or gated: huggingface-cli login).") from None
            if snapshot is None:
                raise FileNotFoundError(f"{entry}: no such file or folder, and the dataset {repo!r} could not "
                                        f"be loaded from the Hugging Face Hub ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0][:160] if str(e) else ''}); check the id, the network "
                                        "(offline: HF_HUB_OFFLINE=1 reads only the local cache), or your token "
                                        "(huggingface-cli login).") from None
            log0(f"data: {repo}: not loaded from the Hub ({type(e).__name__}); reading the cached snapshot {snapshot}")
    if snapshot is None:
        raise FileNotFoundError(f"{entry}: no such file or folder, and no dataset {repo!r} in the Hugging "
                                f"Face cache ({cache}); offline (HF_HUB_OFFLINE=1) nothing is downloaded: download it "
                                f"where there is network (huggingface-cli download --repo-type dataset {repo}), or "
                                "give a local path.")
    return dataset_folder_files(snapshot, select, label, hub=True)


def _download_split(repo, select, label):
    """Online: which files the split has (datasets resolves hf://datasets/REPO like a folder), then those files
    downloaded into the Hugging Face cache (hf_hub_download: resumable, shared with datasets and huggingface-cli)."""
    import huggingface_hub as hh
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        readme = hh.hf_hub_download(repo, "README.md", repo_type="dataset")
    except EntryNotFoundError as e:  # no README on the Hub; LocalEntryNotFoundError (no network) goes on up
        if isinstance(e, LocalEntryNotFoundError):
            raise
        readme = None
    urls, options, others = hub_folder_files(f"hf://datasets/{repo}", select, label, readme=readme or os.devnull)
    fs = hh.HfFileSystem()
    files = []
    for url in urls:
        where = fs.resolve_path(url)
        files.append(hh.hf_hub_download(repo, where.path_in_repo, repo_type="dataset", revision=where.revision))
    files, ignored = _one_kind(files, label)
    return [(f, repo.split("/")[-1]) for f in files], options, {"hidden": [], "ignored": ignored + others}


def dataset_folder_files(folder, select, label, hub=False):
    """A folder written by save_to_disk, or laid out as a dataset repository (hub: known to be one)."""
    source = os.path.basename(os.path.normpath(folder)) if not hub else label.split("[")[0].split("/")[-1]
    if _save_to_disk_kind(folder):
        files, others = saved_dataset_files(folder, select, label)
        return [(f, source) for f in files], {}, {"hidden": [], "ignored": others}
    files, options, others = hub_folder_files(folder, select, label)
    files, ignored = _one_kind(files, label)
    return [(f, source) for f in files], options, {"hidden": [], "ignored": ignored + others}


# ---------------------------------------------------------------------------------------------
# LLaMA-Factory's dataset_info.json
# ---------------------------------------------------------------------------------------------

# Defaults of LLaMA-Factory's DatasetAttr (data/README.md there): alpaca columns, sharegpt tags
LF_ALPACA = {"prompt": "instruction", "query": "input", "response": "output"}
LF_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
           "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
LF_NOT_SFT = {"chosen": "preference (DPO/RM) data", "rejected": "preference (DPO/RM) data", "kto_tag": "KTO data",
              "images": "multimodal data (images)", "videos": "multimodal data (videos)",
              "audios": "multimodal data (audio)"}


def read_dataset_info(path):
    """LLaMA-Factory's dataset_info.json -> {name: attributes}, or None if the file is something else (a
    save_to_disk folder has a dataset_info.json of its own: features, splits, no file_name/hf_hub_url)."""
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError):
        return None
    if isinstance(info, dict) and info and all(isinstance(v, dict) for v in info.values()) and \
            any(k in v for v in info.values() for k in LLAMAFACTORY_SOURCES):
        return info
    return None


def _sft_names(info):
    return [n for n, a in info.items() if not a.get("ranking") and not set(a.get("columns") or {}) & set(LF_NOT_SFT)]


def some_entries(info, name=None, n=5):
    """At most n SFT entry names of a dataset_info.json, the closest to `name` first, and how many there are: a
    message shows a handful, not LLaMA-Factory's hundred."""
    import difflib

    names = _sft_names(info)
    shown = (difflib.get_close_matches(name, names, n=n, cutoff=0.3) if name else []) or names[:n]
    return ", ".join(shown) + (f", ... ({len(names)} in all)" if len(names) > len(shown) else "")


LF_MEDIA = {"images": "images", "videos": "videos", "audios": "audio"}


def not_sft(attr):
    """What a dataset_info.json entry that is not SFT data holds, every kind named (all its media kinds)."""
    if attr.get("ranking"):
        return "preference data (ranking: true)"
    columns = [c for c in LF_NOT_SFT if c in (attr.get("columns") or {})]
    kinds = list(dict.fromkeys(LF_NOT_SFT[c] for c in columns if c not in LF_MEDIA))
    media = [LF_MEDIA[c] for c in columns if c in LF_MEDIA]
    return " and ".join(kinds + ([f"multimodal data ({', '.join(media)})"] if media else []))


def hub_only_error(label, path, repo, error):
    """An entry with hf_hub_url and no file_name that could not be read: it needs the Hub or its cache; say
    whether the network was tried (and what it answered)."""
    import huggingface_hub as hh

    if _offline():
        why = (f"it is not in the cache ({hh.constants.HF_HUB_CACHE}) and the network was not tried (offline: "
               "HF_HUB_OFFLINE=1)")
    else:
        answer = str(error).split("no such file or folder, and ", 1)[-1].split(";")[0].rstrip(".")
        why = f"the network was tried: {answer}"
    return (f"{label}: {path} gives only hf_hub_url {repo!r} (no file_name): it needs the Hugging Face Hub or its "
            f"cache; {why}. Download it where there is network (huggingface-cli download --repo-type dataset {repo}) "
            "or give the entry a file_name of a local copy.")


def dataset_spec(dataset_dir, names, flag="--dataset"):
    """--dataset_dir DIR --dataset a,b:0.5 -> 'DIR/dataset_info.json[a],DIR/dataset_info.json[b]:0.5' (the
    --data_path entries they mean), checked here: the file, and every name. A name ending in .yaml is a
    LLaMA-Factory v1 dataset file (v1_dataset_spec)."""
    items = [n.strip() for n in names.split(",") if n.strip()]
    if any(V1_YAML.search(n) for n in items):
        return ",".join(v1_dataset_spec(dataset_dir, n, flag) if V1_YAML.search(n) else
                        dataset_spec(dataset_dir, n, flag) for n in items)
    path = os.path.join(dataset_dir, "dataset_info.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}: {path} does not exist (--dataset_dir names LLaMA-Factory's data folder, "
                                "the one with dataset_info.json).")
    info = read_dataset_info(path)
    if info is None:
        try:
            with open(path, encoding="utf-8") as f:
                json.load(f)
        except ValueError as e:
            raise ValueError(f"{flag}: {path} is not valid JSON ({e}).") from None
        raise ValueError(f"{flag}: {path} is not LLaMA-Factory's dataset_info.json (an object of named entries, "
                         "each with file_name or hf_hub_url).")
    out = []
    for item in (n.strip() for n in names.split(",")):
        if not item:
            continue
        name, sep, ratio = item.rpartition(":")
        name, ratio = (item, "") if item in info or not sep else (name, f":{ratio}")
        if name not in info:
            raise ValueError(f"{flag} {name}: no such entry in {path}{suggest(name, list(info))}; its SFT entries "
                             f"include: {some_entries(info, name)}.")
        out.append(f"{path}[{name}]{ratio}".replace(",", "\\,"))
    return ",".join(out)


def llamafactory_entry(path, name, flag="--dataset"):
    """One entry of LLaMA-Factory's dataset_info.json -> (files, options, skipped), read the way LLaMA-Factory reads
    it: file_name (under the folder) or hf_hub_url (+ subset, split, folder), formatting alpaca | sharegpt | openai,
    columns (its names -> the data's columns; only the named ones are read), tags, num_samples."""
    info = read_dataset_info(path)
    folder = os.path.dirname(path) or "."
    if not name:
        raise ValueError(f"--data_path {path}: LLaMA-Factory's dataset_info.json; name entries with --dataset_dir "
                         f"{folder} --dataset NAME[,NAME...] (entries: {some_entries(info)}).")
    if name not in info:
        raise ValueError(f"{flag} {name}: no such entry in {path}{suggest(name, list(info))}; its SFT entries "
                         f"include: {some_entries(info, name)}.")
    attr, label = info[name], f"{flag} {name}"
    columns = attr.get("columns")
    if attr.get("ranking") or set(columns or {}) & set(LF_NOT_SFT):
        raise ValueError(f"{label}: {path} describes {not_sft(attr)}, not supervised fine-tuning data; this script "
                         f"trains SFT on text: choose another entry (e.g. {some_entries(info, name)}).")
    formatting = attr.get("formatting", "alpaca")
    if columns is not None and not isinstance(columns, dict) or not isinstance(attr.get("tags", {}), dict):
        raise ValueError(f"{label}: in {path}, columns and tags must be objects.")
    options = {"label": label, "only": True}
    if formatting == "alpaca":
        cols = LF_ALPACA if columns is None else columns
        if cols.get("prompt") and not cols.get("response") and not cols.get("query"):
            options.update(format="text", columns={cols["prompt"]: "text"})  # LLaMA-Factory's pretraining entries
        else:
            options.update(format="alpaca", columns={cols[k]: ours for k, ours in (
                ("prompt", "instruction"), ("query", "input"), ("response", "output"), ("system", "system"),
                ("history", "history"), ("tools", "tools")) if cols.get(k)})
    elif formatting in ("sharegpt", "openai"):
        cols = columns or {}
        key = "conversations" if formatting == "sharegpt" else "messages"
        options.update(format="sharegpt" if formatting == "sharegpt" else "messages", columns={
            cols.get("messages", key): key, **{cols[k]: k for k in ("system", "tools") if cols.get(k)}})
        if formatting == "sharegpt":
            options["tags"] = {**LF_TAGS, **(attr.get("tags") or {})}
    else:
        raise ValueError(f"{label}: formatting {formatting!r} in {path}; alpaca, sharegpt and openai are read.")
    if attr.get("num_samples") is not None:
        if not isinstance(attr["num_samples"], int) or attr["num_samples"] < 1:
            raise ValueError(f"{label}: num_samples in {path} must be a whole number >= 1.")
        options["num_samples"] = attr["num_samples"]
    select = f"{attr['subset']}:{attr.get('split') or ''}" if attr.get("subset") else attr.get("split")
    if attr.get("hf_hub_url"):
        if attr.get("folder"):
            raise ValueError(f"{label}: 'folder' (a sub-folder of a Hub repository) is not read; download it and "
                             "give its file_name.")
        try:
            files, opts, skipped = hub_id_files(attr["hf_hub_url"], select, label)
        except FileNotFoundError as e:
            raise FileNotFoundError(hub_only_error(label, path, attr["hf_hub_url"], e)) from None
        return [(f, name) for f, _ in files], {**opts, **options}, skipped
    if not attr.get("file_name"):
        found = [k for k in LLAMAFACTORY_SOURCES if k in attr]
        raise ValueError(f"{label}: {path} gives {', '.join(found) or 'no source'}; file_name or hf_hub_url are read "
                         "(ModelScope, Modelers, scripts and cloud files are not).")
    local = os.path.join(folder, attr["file_name"])
    if not os.path.exists(local):
        there = sorted(n for n in os.listdir(folder) if n.lower().endswith(READ_SUFFIXES) and n != "dataset_info.json")
        raise FileNotFoundError(f"{label}: file_name {attr['file_name']!r} in {path} does not exist in {folder}"
                                f"{suggest(attr['file_name'], there)} "
                                f"(data files there: {', '.join(there[:8]) or 'none'}).")
    files, opts, skipped = locate(local, flag=label)
    return [(f, name) for f, _ in files], {**opts, **options}, skipped


# ---------------------------------------------------------------------------------------------
# LLaMA-Factory v1's .yaml dataset files: {name: {path, source, converter, size, weight, split}}
# ---------------------------------------------------------------------------------------------

V1_YAML = re.compile(r"\.ya?ml(:[0-9.eE+-]+)?$")
V1_CONVERTERS = {"alpaca": "alpaca", "sharegpt": "sharegpt", None: None}  # None: v1 messages (content parts)


def read_v1_yaml(path):
    """A LLaMA-Factory v1 dataset file -> {name: attributes}, or None if the YAML file is something else."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            info = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if isinstance(info, dict) and info and all(isinstance(v, dict) and "path" in v for v in info.values()):
        return info
    return None


def v1_dataset_spec(dataset_dir, item, flag="--dataset"):
    """--dataset FILE.yaml[:RATIO] (in --dataset_dir, or a path) -> 'FILE.yaml[a],FILE.yaml[b]:W': every dataset
    of the file, each with its weight (times RATIO)."""
    m = re.fullmatch(r"(.+?)(?::([0-9.eE+-]+))?", item)
    name, ratio = m.group(1), float(m.group(2) or 1)
    path = name if os.path.isfile(name) or not os.path.isfile(os.path.join(dataset_dir, name)) else \
        os.path.join(dataset_dir, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {name}: neither {os.path.join(dataset_dir, name)} nor {name} exists "
                                "(a LLaMA-Factory v1 dataset file, .yaml).")
    info = read_v1_yaml(path)
    if info is None:
        raise ValueError(f"{flag} {name}: {path} is not a LLaMA-Factory v1 dataset file (a mapping of named "
                         "datasets, each with path, and source, converter, size, weight, split).")
    out = []
    for entry, attr in info.items():
        weight = attr.get("weight") or 1.0
        if not isinstance(weight, (int, float)) or weight <= 0:
            raise ValueError(f"{flag} {name}: {entry}.weight in {path} must be a number > 0.")
        r = ratio * weight
        out.append(f"{path}[{entry}]" + (f":{r:g}" if r != 1 else ""))
    return ",".join(x.replace(",", "\\,") for x in out)


def v1_local_path(path, yaml_path):
    """A v1 dataset's path, relative to where LLaMA-Factory is run (data/x.json, the folder above data/):
    tried as given, under the .yaml's folder, and under the folder above it."""
    here = os.path.dirname(yaml_path) or "."
    for candidate in (path, os.path.join(here, path), os.path.join(os.path.dirname(os.path.abspath(here)), path)):
        if os.path.isabs(path) or os.path.exists(candidate):
            return candidate
    return None


def llamafactory_v1_entry(path, name, flag="--dataset"):
    """One dataset of a LLaMA-Factory v1 .yaml file -> (files, options, skipped): path (a local file or folder, or a
    Hub id for source hf_hub, the default), converter (alpaca, sharegpt; none: v1 messages with content parts;
    pair: preference data, refused), size (that many samples), split."""
    info = read_v1_yaml(path)
    if not name:
        raise ValueError(f"--data_path {path}: LLaMA-Factory v1 dataset file; read it with --dataset {path} "
                         f"(datasets: {', '.join(list(info)[:5])}{', ...' if len(info) > 5 else ''}).")
    if name not in info:
        raise ValueError(f"{flag} {name}: no such dataset in {path}{suggest(name, list(info))}.")
    attr, label = info[name], f"{flag} {name}"
    converter = attr.get("converter")
    if converter == "pair":
        raise ValueError(f"{label}: {path} gives converter pair: preference (DPO) data, not supervised fine-tuning "
                         "data; this script trains SFT.")
    if converter not in V1_CONVERTERS:
        raise ValueError(f"{label}: converter {converter!r} in {path}; alpaca, sharegpt or none (v1 messages) "
                         "are read.")
    options = {"label": label, **({"format": V1_CONVERTERS[converter]} if converter else {})}
    if attr.get("size") is not None:
        if not isinstance(attr["size"], int) or attr["size"] < 1:
            raise ValueError(f"{label}: size in {path} must be a whole number >= 1.")
        options["num_samples"] = attr["size"]
    local = v1_local_path(str(attr["path"]), path)
    if attr.get("source", "hf_hub") != "local" and local is None:
        files, opts, skipped = hub_id_files(str(attr["path"]), attr.get("split"), label)
    elif local is None:
        raise FileNotFoundError(f"{label}: path {attr['path']!r} in {path} does not exist (tried as given, under "
                                f"{os.path.dirname(path) or '.'} and the folder above it).")
    else:
        files, opts, skipped = locate(local, flag=label)
    return [(f, name) for f, _ in files], {**opts, **options}, skipped


# ---------------------------------------------------------------------------------------------
# --data_path -> entries
# ---------------------------------------------------------------------------------------------


def locate(item, flag="--data_path"):
    """One entry (without its ratio) -> ([(file, source)], options, skipped)."""
    base, select = split_selection(item)
    if os.path.isfile(base) and base.lower().endswith((".yaml", ".yml")) and read_v1_yaml(base) is not None:
        return llamafactory_v1_entry(base, select, flag="--dataset" if select else flag)
    if os.path.isfile(base):
        if os.path.basename(base) == "dataset_info.json" and read_dataset_info(base) is not None:
            return llamafactory_entry(base, select, flag="--dataset" if select else flag)
        if select is not None:
            raise ValueError(f"{flag} {item}: [{select}] selects a split of a dataset folder or Hub id; {base} is a "
                             "file (a file that exists as written is read as it is: no selection).")
        files, skipped = list_data_files(base)
        if file_kind(base) is None:
            raise ValueError(f"{flag} {base}: not a data file finetune reads (give {', '.join(READ_SUFFIXES)}; "
                             "Excel: pandas.read_excel(...).to_parquet('data.parquet')).")
        return files, {}, skipped
    if os.path.isdir(base):
        if os.path.isfile(os.path.join(base, "dataset_info.json")) and not _save_to_disk_kind(base):
            info = read_dataset_info(os.path.join(base, "dataset_info.json"))
            if info is not None and select:
                return llamafactory_entry(os.path.join(base, "dataset_info.json"), select)
            if info is not None:
                raise ValueError(f"{flag} {base}: LLaMA-Factory's data folder (its dataset_info.json names the data); "
                                 f"read its entries with --dataset_dir {base} --dataset NAME[,NAME...] (entries: "
                                 f"{some_entries(info)}).")
        if select is not None or _save_to_disk_kind(base) or is_hub_folder(base):
            return dataset_folder_files(base, select, item)
        files, skipped = list_data_files(base)
        return files, {}, skipped
    return hub_id_files(base, select, item)


def resolve_data_spec(spec, columns=None):
    """--data_path -> ([Entry], skipped). `columns` ({source column: key}, --columns) applies to the entries that
    do not bring their own (LLaMA-Factory's). A file reached twice (named twice, via a folder and by name, or
    through a link) is an error: it would silently double its data."""
    entries, skipped, seen = [], {"hidden": [], "ignored": []}, {}
    for i, (path, ratio) in enumerate(parse_data_spec(spec)):
        files, options, skip = locate(path)
        if "columns" not in options and columns:
            options["columns"] = dict(columns)
        for kind in skipped:
            skipped[kind] += skip[kind]
        for file, _ in files:
            other = seen.setdefault(file_id(file), (file, path, i))
            if other != (file, path, i):
                raise ValueError(f"--data_path: {file} would be read twice (entries {other[1]!r} and {path!r}"
                                 + (f", as {other[0]}" if other[0] != file else "") + "); give each file once, "
                                 f"and use a ratio to repeat data (e.g. {path}:2).")
        entries.append(Entry(path, ratio, files, options))
    return entries, skipped


def check_data_flags(args):
    """The data flags of DataArguments, checked and parsed before anything is read: --dataset/--eval_dataset become
    the --data_path/--eval_data_path entries they mean; --columns -> args.column_map; --chat_template_kwargs ->
    args.template_kwargs; --val_size (a share or a number; not with an evaluation set of its own)."""
    for names, flag, attr in ((args.dataset, "--dataset", "data_path"), (args.eval_dataset, "--eval_dataset",
                                                                          "eval_data_path")):
        spec = names and dataset_spec(args.dataset_dir, names, flag)
        if spec and spec not in (getattr(args, attr) or ""):
            setattr(args, attr, ",".join(x for x in (getattr(args, attr), spec) if x))
    if not args.data_path:
        raise ValueError("--data_path (or --dataset) is required: files, folders or Hub dataset ids, comma-separated.")
    args.column_map = {}
    for item in (args.columns or "").split(","):
        if not item.strip():
            continue
        name, sep, key = (x.strip() for x in item.partition("="))
        if not (sep and name and key):
            raise ValueError(f"--columns {args.columns}: {item.strip()!r} is not NAME=KEY (e.g. --columns "
                             "question=prompt,answer=completion).")
        if key not in RECORD_KEYS + MESSAGE_KEYS:  # a record's key, or a message's (renamed inside every message)
            raise ValueError(f"--columns {item.strip()}: {key!r} is not a key of a format or of a message"
                             f"{suggest(key, RECORD_KEYS + MESSAGE_KEYS)} (a record's: {', '.join(RECORD_KEYS)}; a "
                             f"message's: {', '.join(MESSAGE_KEYS)}).")
        if name in args.column_map or key in args.column_map.values():
            raise ValueError(f"--columns {args.columns}: {name if name in args.column_map else key!r} appears twice.")
        args.column_map[name] = key
    args.template_kwargs = parse_template_kwargs(args.chat_template_kwargs)
    args.placeholder_map = parse_placeholders(args.placeholders)
    v = args.val_size
    if v is not None:
        if args.eval_data_path:
            raise ValueError("--val_size holds out part of the training data as the evaluation set, and "
                             "--eval_data_path (or --eval_dataset) gives one: use one of them.")
        if not (math.isfinite(v) and v > 0 and (v < 1 or v == int(v))):
            raise ValueError(f"--val_size {v:g}: a share of the training samples (0 < F < 1) or a whole number of "
                             "samples (>= 1).")

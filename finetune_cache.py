"""The dataset cache, for finetune.py: where tokenized datasets are kept and under which key, how an entry is built
(into a temporary folder, a manifest of sizes and checksums written last, renamed into place when complete), when
an entry is reused (only if it matches its manifest; a damaged one is rebuilt with a note, or refused with the
command that clears it), and the clearing of what a killed or failed build left. README: "Preprocessing and
cache", "When a run fails".

    path = entry_path(entries, tokenizer, data_args, training_args)  # --dataset_cache_dir (~/.cache/finetune)/key
    build_entry(path, write)  # write(tmp) fills the folder, once -> path

An artefact that belongs to one dataset (a figure computed from it, say) sits beside its entry, keyed like it:
build_entry(f"{path}-NAME", write) builds and checks it the same way (remove_stale_temps and the damage checks
included). What goes into a dataset entry (the read, validated, tokenized samples and their report) is
finetune.py's _write_dataset.
"""

import glob
import hashlib
import json
import os
import shutil
import socket

from finetune_console import log0
from finetune_faults import DISK_ERRNOS, failed_file, with_free_space, write_error

CACHE_VERSION = "9"  # bump when tokenization output changes, to invalidate old caches (9: the key ledger)
MANIFEST = "manifest.json"


def dataset_cache_root(data_args):
    return data_args.dataset_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "finetune")


def cache_key(entries, tokenizer, data_args, training_args):
    """Every file's path, size, mtime, inode and ctime (an in-place edit that restores size and mtime
    still changes ctime; a file replaced by another one changes the inode), the ratios, the tokenizer,
    the template and every setting that changes the tokens; how each entry is read (format, columns, tags)."""
    files = []
    for entry in entries:
        for file, _ in entry.files:
            st = os.stat(file)
            files.append([os.path.abspath(file), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, entry.ratio,
                          entry.options])
    h = hashlib.sha256(json.dumps({
        "v": CACHE_VERSION, "files": files, "format": data_args.data_format,
        "template": tokenizer.chat_template, "max_len": training_args.model_max_length,
        "specials": [tokenizer.bos_token, tokenizer.eos_token],
        "prompt": data_args.train_on_prompt, "last": data_args.train_on_last_turn_only, "long": data_args.long_text,
        "placeholders": data_args.placeholder_map, "skip": data_args.skip_invalid_records, "seed": training_args.seed,
        "template_kwargs": data_args.template_kwargs, "val_size": data_args.val_size,
        "mask_reasoning": data_args.mask_reasoning, "names": data_args.message_names,
    }, sort_keys=True).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    return h.hexdigest()[:20]


def entry_path(entries, tokenizer, data_args, training_args, cache_root=None):
    """The folder of a dataset's entry: cache_root (default: dataset_cache_root(data_args)) / its cache_key. Anything
    computed from that dataset can be kept beside it, keyed like it: build_entry(f"{entry_path(...)}-NAME", write)."""
    root = cache_root or dataset_cache_root(data_args)
    return os.path.join(root, cache_key(entries, tokenizer, data_args, training_args))


def build_entry(path, write):
    """-> path, holding a complete entry: the one there if it matches its manifest (reuse_cache_entry), else one
    built by write(tmp) into a temporary folder, its manifest written last, renamed into place (atomic: a crash
    never leaves a half-written entry that looks complete). The temporary folder goes on any failure."""
    if reuse_cache_entry(path):  # only an entry that matches its manifest; a damaged one is rebuilt (a note)
        return path
    tmp = cache_temp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        write_cache_manifest(tmp)  # sizes and checksums, written last: an entry is used only if it matches them
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def cache_temp_name(path):
    """Where an entry is built before it is renamed to `path`: host and process id, so that a leftover of a
    killed run can be recognised (remove_stale_temps) without touching a build in progress elsewhere."""
    return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"


def remove_stale_temps(path, only_mine=False):
    """Temporary folders beside `path` (any entry's) left by builds of this host whose process no longer runs
    (killed); only_mine: this process's own (after a failed build)."""
    host = socket.gethostname()
    for tmp in glob.glob(os.path.join(glob.escape(os.path.dirname(path)), "*.tmp-*")):
        owner, _, pid = tmp.rsplit(".tmp-", 1)[-1].rpartition("-")
        if owner == host and pid.isdigit() and (int(pid) == os.getpid() if only_mine else
                                                 int(pid) != os.getpid() and not _alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _checksum(path):
    import xxhash  # a dependency of datasets

    h = xxhash.xxh64()
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def _entry_files(folder):
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST:
                yield rel


def atomic_write_json(path, value):
    """Write to a temporary name in the same folder, flush to disk, rename: all of it or nothing."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_cache_manifest(folder):
    """Size and xxh64 checksum of every file of a finished entry, written last (before the entry is renamed)."""
    files = {rel: [os.path.getsize(os.path.join(folder, rel)), _checksum(os.path.join(folder, rel))]
             for rel in _entry_files(folder)}
    atomic_write_json(os.path.join(folder, MANIFEST), {"files": files})


def check_cache_entry(folder):
    """None if every file the manifest lists is there with its size and checksum, else what is wrong."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            files = json.load(f)["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}: it was not written to the end"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__})"
    for rel, (size, checksum) in sorted(files.items()):
        path = os.path.join(folder, rel)
        try:
            actual = os.path.getsize(path)
        except OSError:
            return f"{rel} is missing"
        if actual != size:
            return f"{rel} has {actual:,} bytes, {size:,} when it was written"
        try:
            if _checksum(path) != checksum:
                return f"{rel} differs from what was written (checksum)"
        except OSError as e:
            return f"{rel} cannot be read ({e.strerror})"
    return None


def reuse_cache_entry(path):
    """True: the entry at `path` is complete and unchanged, use it. False: there is none (any more): build it; a
    damaged one is removed first, with a note. A damaged one that cannot be removed -> ValueError (one line)."""
    remove_stale_temps(path)
    if not os.path.lexists(path):
        return False
    damage = check_cache_entry(path) if os.path.isdir(path) else "not a folder"
    if damage is None:
        return True
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    except OSError as e:
        raise ValueError(f"dataset cache {path} is damaged ({damage}) and cannot be rebuilt: removing it failed "
                         f"({e.strerror}). Clear it with: rm -rf {path}  (or set --dataset_cache_dir to another "
                         "folder)") from None
    log0(f"note: dataset cache {path} was damaged ({damage}); rebuilding it")
    return False


def cache_write_error(e, cache_root):
    """A failed write while building the dataset cache -> ValueError (one line, the path and the fix), else None."""
    failed = write_error(e)
    if failed is None:
        return None
    name = failed_file(e)
    if failed[0] not in DISK_ERRNOS and not (name and os.path.abspath(name).startswith(os.path.abspath(cache_root))):
        return None  # not surely the cache's (a data file that cannot be read, ...)
    _, text = with_free_space(*failed, cache_root, None)
    remove_stale_temps(os.path.join(cache_root, "x"), only_mine=True)  # what this build wrote so far
    return ValueError(f"writing the dataset cache in {cache_root} failed: {text}. Nothing of it is kept (a "
                      "half-written entry is never used). Free space there, or set --dataset_cache_dir to another "
                      f"disk; old entries are cleared with: rm -rf {os.path.join(cache_root, '*')}")

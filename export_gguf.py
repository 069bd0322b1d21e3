"""Export a fine-tuned run to one GGUF file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile.

    python export_gguf.py RUN_DIR --outtype f16|bf16|q8_0|q4_k_m --outfile model.gguf [--system TEXT]

RUN_DIR is finetune.py's --output_dir: a full fine-tune is converted as it is; a LoRA / DoRA / Q-LoRA adapter is
first merged into its base (merge_lora.py: the base named in adapter_config.json, or --base; its vocabulary grown
as in training) in a temporary folder. The conversion is llama.cpp's own convert_hf_to_gguf.py with its gguf-py,
taken at run time from the llama-cpp-python source distribution on PyPI (CONVERTER_PACKAGE, pinned) and kept in
$FINETUNE_CONVERTER_CACHE (default ~/.cache/finetune/llama.cpp/VERSION), so only the first export downloads it.
f32/f16/bf16/q8_0 are the converter's; q4_k_m is llama.cpp's quantizer run on a 16-bit conversion, through the
compiled llama-cpp-python package (`pip install llama-cpp-python==0.3.36`: it builds llama.cpp).

The GGUF carries what the run trained with: the chat template (tokenizer.chat_template), the template's turn end
as the eos (finetune.py makes it the tokenizer's eos; where it could not, it is written as the eot token), and the
tokens finetune added to a base model's vocabulary. After writing, the file is read back and these are checked.
Next to it goes `Modelfile` (FROM ./FILE.gguf, the turn end as stop strings, the system prompt the run was
trained with, or --system) for `ollama create NAME -f Modelfile`. The .gguf is written under a temporary name
and renamed when complete: a failed or interrupted export leaves no half file.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import tarfile
import tempfile

CONVERTER_PACKAGE = "llama-cpp-python==0.3.36"
CONVERTER_VERSION = CONVERTER_PACKAGE.split("==")[1]
# What the conversion needs from the source distribution (paths under its vendor/llama.cpp/): the script, its
# per-architecture modules and llama.cpp's gguf-py (which the script puts first on its sys.path).
CONVERTER_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by convert_hf_to_gguf.py itself
QUANTIZED_TYPES = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}  # llama.cpp's quantizer, from a 16-bit conversion
OUTTYPES = CONVERTER_TYPES + tuple(QUANTIZED_TYPES)
INSTALL_QUANTIZER = f"pip install {CONVERTER_PACKAGE} (it compiles llama.cpp: several minutes on a few cores)"
# Run in a child process: llama.cpp logs every tensor to stderr; the parent keeps the log for a failure.
QUANTIZE_SCRIPT = """import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, sys.argv[3])
params.nthread = int(sys.argv[4])
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def log(*args):
    print("[export_gguf]", *args, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="finetune.py's --output_dir (full fine-tune, or a LoRA/DoRA/Q-LoRA adapter).")
    p.add_argument("--outtype", default="f16", help=f"One of {', '.join(OUTTYPES)} (default f16).")
    p.add_argument("--outfile", required=True, help="The .gguf file to write; Modelfile goes next to it.")
    p.add_argument("--base", default=None, help="Adapter runs: the base model (default: the one in "
                                                "adapter_config.json).")
    p.add_argument("--system", default=None, help="System prompt for the Modelfile (default: the one every "
                                                  "training conversation had, if they shared one).")
    p.add_argument("--overwrite", action="store_true", help="Replace an existing --outfile and its Modelfile.")
    p.add_argument("--cache_dir", default=None, help="Folder for llama.cpp's converter (default: "
                                                     "$FINETUNE_CONVERTER_CACHE or ~/.cache/finetune/llama.cpp).")
    return p.parse_args(argv)


def check_args(args):
    """Fail before any download, merge or conversion: the run folder, the type, the destination."""
    if args.outtype not in OUTTYPES:
        raise SystemExit(f"error: --outtype {args.outtype}: unknown; choose one of {', '.join(OUTTYPES)}.")
    if not os.path.isdir(args.run_dir):
        raise SystemExit(f"error: RUN_DIR {args.run_dir}: no such directory (pass finetune.py's --output_dir).")
    if not any(os.path.isfile(os.path.join(args.run_dir, f)) for f in ("config.json", "adapter_config.json")):
        raise SystemExit(f"error: RUN_DIR {args.run_dir} holds no model (no config.json or adapter_config.json): "
                         "pass the --output_dir of a finished run, or one of its checkpoint-N folders.")
    if not args.outfile.endswith(".gguf"):
        raise SystemExit(f"error: --outfile {args.outfile}: name it FILE.gguf (Ollama's FROM and LM Studio look "
                         "for the extension).")
    folder = os.path.dirname(os.path.abspath(args.outfile))
    if not os.path.isdir(folder):
        raise SystemExit(f"error: --outfile {args.outfile}: the folder {folder} does not exist.")
    modelfile = os.path.join(folder, "Modelfile")
    for path in (args.outfile, modelfile):
        if os.path.exists(path) and not args.overwrite:
            raise SystemExit(f"error: {path} exists; pass --overwrite to replace it.")
    if args.outtype in QUANTIZED_TYPES:
        quantizer_or_exit()
    try:
        import sentencepiece  # noqa: F401  (convert_hf_to_gguf.py imports it for every Llama-family model)
    except ImportError:
        raise SystemExit("error: llama.cpp's converter needs sentencepiece: pip install sentencepiece") from None
    return modelfile


def quantizer_or_exit():
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("error: --outtype q4_k_m needs llama.cpp's quantizer, from the llama-cpp-python package: "
                         f"{INSTALL_QUANTIZER}; or choose --outtype f16, bf16 or q8_0.") from None
    return llama_cpp


def default_cache_dir():
    return os.environ.get("FINETUNE_CONVERTER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "finetune",
                                                                      "llama.cpp")


def ensure_converter(cache_dir=None):
    """-> the folder holding llama.cpp's convert_hf_to_gguf.py (and conversion/, gguf-py/) of CONVERTER_PACKAGE:
    downloaded with pip (`pip download --no-deps`, the source distribution: 77 MB) and unpacked on first use, then
    reused. Unpacked in a temporary folder and renamed when complete."""
    cache_dir = cache_dir or default_cache_dir()
    out = os.path.join(cache_dir, CONVERTER_VERSION)
    if os.path.isfile(os.path.join(out, "convert_hf_to_gguf.py")):
        return out
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".{CONVERTER_VERSION}-") as work:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "--disable-pip-version-check", "--dest", work, CONVERTER_PACKAGE]
        log(f"fetching llama.cpp's converter from PyPI ({CONVERTER_PACKAGE} source, 77 MB, once)")
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sdists = glob.glob(os.path.join(work, "*.tar.gz"))
        if proc.returncode != 0 or len(sdists) != 1:
            raise SystemExit(f"error: pip download {CONVERTER_PACKAGE} failed (exit {proc.returncode}); PyPI must "
                             f"be reachable:\n{proc.stdout.strip()}")
        staging = os.path.join(work, "converter")
        with tarfile.open(sdists[0]) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/", 3)  # llama_cpp_python-V/vendor/llama.cpp/REST
                if len(parts) == 4 and parts[1:3] == ["vendor", "llama.cpp"] and (member.isfile() or member.isdir()) \
                        and parts[3].startswith(CONVERTER_MEMBERS):
                    member.name = parts[3]
                    tar.extract(member, staging, filter="data")
        if not os.path.isfile(os.path.join(staging, "convert_hf_to_gguf.py")):
            raise SystemExit(f"error: {CONVERTER_PACKAGE}'s source has no vendor/llama.cpp/convert_hf_to_gguf.py.")
        try:
            os.rename(staging, out)
        except OSError:  # another export unpacked it first
            if not os.path.isfile(os.path.join(out, "convert_hf_to_gguf.py")):
                raise
    return out


def model_folder(args, work):
    """The Hugging Face folder to convert: the run itself (full fine-tune), or the adapter merged into its base in
    `work`. The one place that turns a run into a full model; it goes through merge_lora.py."""
    if not os.path.isfile(os.path.join(args.run_dir, "adapter_config.json")):
        return args.run_dir
    import merge_lora

    merge_args = ["--adapter", args.run_dir, "--output", os.path.join(work, "merged")]
    return merge_lora.merge(merge_lora.parse_args(merge_args + (["--base", args.base] if args.base else [])))


def read_config(folder):
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def vocabulary_filling_the_rows(folder, work):
    """llama.cpp wants one vocabulary entry per embedding row. finetune.py grows a base model's rows to a multiple
    of 64 when it adds tokens, so the rows can outnumber the tokenizer's entries; the converter fills that gap with
    [PAD<id>] control tokens for BPE and SentencePiece vocabularies but not for a Llama tokenizer.json. -> `folder`
    itself when the counts agree, else a folder in `work` whose tokenizer has those control tokens (never
    produced from text; their rows are the untrained mean rows) and links to every other file of `folder`."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    config = read_config(folder)
    rows = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return folder  # nothing to fill: the converter reports what it lacks
    if not isinstance(rows, int) or rows <= len(tokenizer):
        return folder
    staging = os.path.join(work, "vocabulary")
    tokenizer.add_tokens([AddedToken(f"[PAD{i}]", special=True, normalized=False) for i in range(len(tokenizer), rows)],
                         special_tokens=True)
    tokenizer.save_pretrained(staging)
    for name in os.listdir(folder):
        if not os.path.exists(os.path.join(staging, name)):
            os.symlink(os.path.abspath(os.path.join(folder, name)), os.path.join(staging, name))
    return staging


def run_logged(cmd, what, env=None):
    """Run a child process, its output kept; on failure show its last lines and exit non-zero."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
        raise SystemExit(f"error: {what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def convert(converter, folder, outtype, dest):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter's own gguf-py, whatever gguf version is installed
    run_logged([sys.executable, os.path.join(converter, "convert_hf_to_gguf.py"), folder, "--outtype", outtype,
                "--outfile", dest], f"llama.cpp's convert_hf_to_gguf.py ({outtype})", env)


def quantize(src, dest, outtype):
    out = run_logged([sys.executable, "-c", QUANTIZE_SCRIPT, src, dest, QUANTIZED_TYPES[outtype],
                      str(os.cpu_count() or 1)], f"llama.cpp's quantizer ({outtype})")
    fallbacks = [line for line in out.splitlines() if "fallback quantization" in line]
    if fallbacks:  # k-quants need rows that are a multiple of 256 values; llama.cpp picks another type for the rest
        log(f"{len(fallbacks)} tensors have rows that are not a multiple of 256 values (what {outtype} needs): "
            "llama.cpp stored them in its fallback type, as llama-quantize does")


def gguf_metadata(path, converter):
    """-> {key: value} of the GGUF's scalar and string fields, read with the converter's gguf-py."""
    sys.path.insert(0, os.path.join(converter, "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    reader = GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "merges", "scores", "token_type")):
            continue  # the vocabulary arrays: read below where needed
        try:
            out[key] = field.contents()
        except (TypeError, ValueError, IndexError):
            pass
    out["tokenizer.ggml.tokens"] = reader.fields["tokenizer.ggml.tokens"].contents()
    return out


def check_gguf(path, folder, converter):
    """The GGUF must carry the trained tokenizer's template, vocabulary and turn end; where the eos is not a turn
    end token (finetune.py could not make it one), the first turn end is written as the eot token with gguf-py's
    gguf_new_metadata (a copy: it cannot edit in place). -> (turn end tokens, meta)."""
    from transformers import AutoTokenizer

    from finetune_template import end_of_turn_tokens

    tokenizer = AutoTokenizer.from_pretrained(folder)
    meta = gguf_metadata(path, converter)
    tokens = meta["tokenizer.ggml.tokens"]
    problems = []
    if meta.get("tokenizer.chat_template") != tokenizer.chat_template:
        problems.append("the chat template differs from the tokenizer's")
    missing = [t for t, i in tokenizer.get_added_vocab().items() if i >= len(tokens) or tokens[i] != t]
    if missing:
        problems.append(f"added tokens missing or moved: {' '.join(missing[:5])}")
    if problems:
        raise SystemExit(f"error: the converted GGUF does not carry the trained tokenizer ({'; '.join(problems)}); "
                         f"report this with {CONVERTER_PACKAGE} and your model's config.json.")
    ends = end_of_turn_tokens(tokenizer) or [tokenizer.eos_token]
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos is None or tokens[eos] not in ends:
        fixed = path + ".eot"
        run_logged([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", path, fixed, "--force",
                    "--special-token", "eot", ends[0]], "gguf_new_metadata (eot token)",
                   {**os.environ, "PYTHONPATH": os.path.join(converter, "gguf-py")})
        os.replace(fixed, path)
        log(f"eos is {tokens[eos] if eos is not None else 'unset'}: the turn end {ends[0]} written as the eot token")
    tokenize_as_trained(path, converter)
    return ends, meta


def tokenize_as_trained(path, converter):
    """finetune.py tokenizes the rendered template without adding special tokens: a bos is there only where the
    template writes it. A GGUF whose tokenizer adds a bos (or eos) itself would start every llama.cpp prompt with a
    token training never put there, so those flags are turned off in place (gguf-py's GGUFReader in r+ mode, as
    its gguf_set_metadata script does)."""
    sys.path.insert(0, os.path.join(converter, "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.pop(0)
    reader = GGUFReader(path, "r+")
    for key in ("tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token"):
        field = reader.get_field(key)
        if field is not None and field.contents():
            field.parts[field.data[0]][0] = False
            log(f"{key} set to false: prompts are tokenized as in training (the template writes any bos itself)")
    reader.data.flush()
    del reader


def trained_system_prompt(run_dir):
    """The system prompt every training conversation started with, read from the data files the run names in
    data_report.json; None if they had none, differed, or the files are gone."""
    try:
        with open(os.path.join(run_dir, "data_report.json")) as f:
            files = list(json.load(f)["train"]["files"])
    except (OSError, ValueError, KeyError):
        return None
    from finetune_data import RecordError, detect_format, normalize_record, read_records

    prompts = set()
    for path in files:
        if not os.path.isfile(path):
            return None
        for _, record in read_records(path):
            if not isinstance(record, dict):  # a broken line: training skipped or refused it too
                continue
            try:
                messages, _ = normalize_record(record, detect_format(record))
            except (RecordError, TypeError, ValueError, KeyError):
                continue
            prompts.add(messages[0]["content"] if messages[0]["role"] == "system" else None)
            if len(prompts) > 1:
                return None
    return next(iter(prompts), None)


def modelfile_text(gguf_name, stops, system):
    """Ollama's Modelfile: the weights, tokenizer and chat template come from the GGUF; the stop strings and the
    system prompt are written out, so that they hold whichever template Ollama derives."""
    lines = [f"FROM ./{gguf_name}"]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in dict.fromkeys(stops)]
    if system:
        lines.append(f'SYSTEM """{system}"""' if '"""' not in system else f"SYSTEM {json.dumps(system)}")
    return "\n".join(lines) + "\n"


def export(args):
    modelfile = check_args(args)
    converter = ensure_converter(args.cache_dir)
    outfile = os.path.abspath(args.outfile)
    folder = os.path.dirname(outfile)
    tmp_gguf = os.path.join(folder, f".{os.path.basename(outfile)}.tmp-{os.getpid()}")
    with tempfile.TemporaryDirectory(dir=folder, prefix=".export_gguf-") as work:
        try:
            model = model_folder(args, work)
            convertible = vocabulary_filling_the_rows(model, work)
            if args.outtype in QUANTIZED_TYPES:
                config = read_config(model)
                dtype = config.get("dtype") or config.get("torch_dtype")
                wide = "bf16" if dtype == "bfloat16" else "f16"  # the quantizer's input
                log(f"converting {model} to {wide} with llama.cpp's convert_hf_to_gguf.py, then {args.outtype}")
                convert(converter, convertible, wide, os.path.join(work, "wide.gguf"))
                quantize(os.path.join(work, "wide.gguf"), tmp_gguf, args.outtype)
            else:
                log(f"converting {model} to {args.outtype} with llama.cpp's convert_hf_to_gguf.py")
                convert(converter, convertible, args.outtype, tmp_gguf)
            stops, meta = check_gguf(tmp_gguf, model, converter)
            system = args.system if args.system is not None else trained_system_prompt(args.run_dir)
            os.replace(tmp_gguf, outfile)
        finally:
            if os.path.exists(tmp_gguf):
                os.remove(tmp_gguf)
    with open(modelfile + ".tmp", "w", encoding="utf-8") as f:
        f.write(modelfile_text(os.path.basename(outfile), stops, system))
    os.replace(modelfile + ".tmp", modelfile)
    size = os.path.getsize(outfile) / 2**20
    log(f"wrote {outfile} ({args.outtype}, {size:.0f} MiB; chat template and turn end {' '.join(stops)} in it) "
        f"and {modelfile}" + (" (with the trained system prompt)" if system else ""))
    return outfile


def main(argv=None):
    args = parse_args(argv)
    from finetune_console import quiet_known_notices

    quiet_known_notices()
    import transformers

    transformers.logging.disable_progress_bar()
    export(args)


if __name__ == "__main__":
    main()

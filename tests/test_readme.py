"""The flag tables of the manual (docs/training.md, "Flags") are generated from finetune.py's argument
dataclasses, the source of --help: one text for each flag.

    python tests/test_readme.py      # rewrite the tables in docs/training.md after changing a flag
"""

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FLAGS_PAGE = ROOT / "docs" / "training.md"  # the page that holds the generated tables
BEGIN = "<!-- flags: generated from finetune.py's argument dataclasses by `python tests/test_readme.py`; edit those -->"
END = "<!-- flags: end -->"


def flag_tables():
    import finetune

    own = {f.name for f in dataclasses.fields(finetune.TrainingArguments)} - {
        f.name for f in dataclasses.fields(finetune.transformers.TrainingArguments)}
    changed = {n for n in vars(finetune.TrainingArguments).get("__annotations__", {})}
    out = []
    for cls in finetune.ARGUMENT_CLASSES:
        fields = [f for f in dataclasses.fields(cls) if f.init and "help" in f.metadata]
        title = f"**{cls.__name__}**"
        if cls is finetune.TrainingArguments:
            fields = [f for f in fields if f.name in own | changed]
            title += " (what finetune.py adds or changes; every `transformers.TrainingArguments` flag works too)"
        out += [title, "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            meaning = f.metadata["help"].replace("\\", "\\\\").replace("|", "\\|")
            out.append(f"| `--{f.name}` | `{default}` | {meaning} |")
        out.append("")
    return "\n".join(out).rstrip("\n")


def page_parts():
    text = FLAGS_PAGE.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, (
        f"{FLAGS_PAGE.relative_to(ROOT)} lost its generated-flags markers ({BEGIN!r} ... {END!r})")
    head, rest = text.split(BEGIN, 1)
    table, tail = rest.split(END, 1)
    return head, table.strip("\n"), tail


def test_flag_tables_match_the_dataclasses():
    _, table, _ = page_parts()
    assert table == flag_tables(), (
        f"the flag tables in {FLAGS_PAGE.relative_to(ROOT)} are out of date: run python tests/test_readme.py")


if __name__ == "__main__":
    head, _, tail = page_parts()
    FLAGS_PAGE.write_text(f"{head}{BEGIN}\n\n{flag_tables()}\n\n{END}{tail}", encoding="utf-8")
    print(f"{FLAGS_PAGE.relative_to(ROOT)} flag tables rewritten")

"""The README's flag tables are generated from finetune.py's argument dataclasses, the source of --help: one
text for each flag.

    python tests/test_readme.py      # rewrite the tables in README.md after changing a flag
"""

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
README = ROOT / "README.md"
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


def readme_parts():
    text = README.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"README.md lost its generated-flags markers ({BEGIN!r} ... {END!r})"
    head, rest = text.split(BEGIN, 1)
    table, tail = rest.split(END, 1)
    return head, table.strip("\n"), tail


def test_flag_tables_match_the_dataclasses():
    _, table, _ = readme_parts()
    assert table == flag_tables(), "README flag tables are out of date: run python tests/test_readme.py"


if __name__ == "__main__":
    head, _, tail = readme_parts()
    README.write_text(f"{head}{BEGIN}\n\n{flag_tables()}\n\n{END}{tail}", encoding="utf-8")
    print("README.md flag tables rewritten")

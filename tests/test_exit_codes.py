"""The exit codes are one table (finetune_exit_codes.ExitCode): finetune.sh, docs/troubleshooting.md and the
README's table state the same codes, and no Python file writes one as a number of its own."""

import re

from conftest import ROOT
from finetune_exit_codes import DELIBERATE_EXIT_CODES, ExitCode


def test_finetune_sh_and_the_docs_state_the_table():
    codes = set(DELIBERATE_EXIT_CODES)
    assert codes == {2, 3, 74, 75} | {int(c) for c in ExitCode}  # the four a run can stop with, at least
    sh = (ROOT / "finetune.sh").read_text()
    # the codes finetune.sh passes on (every worker ended the same deliberate way), and the comment above them
    (passed,) = re.findall(r'"\$codes" =~ \^\(0\|([\d|]+)\)\$', sh)
    assert {int(c) for c in passed.split("|")} == codes, passed
    (said,) = re.findall(r"writes its exit code \(0 done,\n# ([^)]*)\)", sh)
    assert {int(c) for c in re.findall(r"\b(\d+) [a-z]", said)} == codes, said
    # docs/troubleshooting.md: "Exit codes: 0 done, 1 crash (...), 2 bad input (...), 3 ...", and a section per code
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    (paragraph,) = re.findall(r"^Exit codes: (.*?)\n\n", page, re.M | re.S)
    paragraph = re.sub(r"\([^()]*(\([^()]*\)[^()]*)*\)", "", paragraph)  # the explanations in parentheses
    stated = {int(c) for c in re.findall(r"(?:^|,\s)(\d+) ", paragraph)}
    assert stated - {0, 1} == codes, paragraph
    sections = {int(c) for c in re.findall(r"^## Exit code (\d+):", page, re.M)}
    assert sections - {1} == codes, f"docs/troubleshooting.md has sections for exit codes {sorted(sections)}"
    # README, "When a run stops": a row per code
    readme = (ROOT / "README.md").read_text()
    rows = {int(c) for c in re.findall(r"^\| (\d+) \|", readme, re.M)}
    assert rows - {0} == codes, f"README's exit code table has {sorted(rows)}"


def test_no_python_file_writes_an_exit_code_of_its_own():
    literal = re.compile(r"(exit\(|exit_code = |EXIT_CODES? = )\(?\s*(2|3|74|75)\b")
    for path in sorted(ROOT.glob("*.py")):
        if path.name != "finetune_exit_codes.py":
            found = [line for line in path.read_text().splitlines() if literal.search(line)]
            assert not found, (path.name, found)

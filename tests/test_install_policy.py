"""The install policy (docs/development.md, "Upgrading libraries"): a fresh machine gets the versions the suite
passed on.

- requirements.txt bounds every library whose internals finetune relies on (LIBRARY_INTERNALS) from above;
- constraints.txt pins each requirement to one version inside its range (the last green run);
- the README's two commands install with the constraints, and .ci/run runs the README's test command.
No network, no install: these read the files."""

import re
from pathlib import Path

from packaging.requirements import Requirement

from finetune_distributed import LIBRARY_INTERNALS

ROOT = Path(__file__).resolve().parents[1]


def _requirements():
    reqs = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            reqs[_norm(req.name)] = req
    return reqs


def _constraints():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: '{line}' is not NAME==VERSION"
            pins[_norm(name)] = version.strip()
    return pins


def _norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def test_libraries_with_internals_are_bounded_above():
    named = {_norm(m.group(1)) for e in LIBRARY_INTERNALS
             for m in re.finditer(r"\b(transformers|accelerate|deepspeed|peft|torch|jinja2|bitsandbytes|datasets)\b",
                                  e["checked"])}
    reqs = _requirements()
    assert named <= set(reqs), f"libraries with listed internals missing from requirements.txt: {named - set(reqs)}"
    for name in named | {"datasets"}:
        assert any(s.operator in ("<", "<=", "==", "~=") for s in reqs[name].specifier), (
            f"requirements.txt: {name} has no upper bound ({reqs[name]}), yet finetune relies on its internals")


def test_constraints_pin_every_requirement_inside_its_range():
    pins, reqs = _constraints(), _requirements()
    for name, req in reqs.items():
        if req.marker is not None and not req.marker.evaluate():
            continue
        assert name in pins, f"constraints.txt does not pin {name} (requirements.txt: {req})"
        if name != "torch":  # torch is installed first, as the README says; its pin is the README's
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"constraints.txt pins {name}=={pins[name]}, outside requirements.txt's {req.specifier}")


def test_readme_commands_install_the_tested_versions():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^pip install torch==[^\n]*$", readme, flags=re.M)
    assert any("requirements.txt" in c for c in commands) and any("requirements-test.txt" in c for c in commands)
    for command in commands:
        assert "-c constraints.txt" in command, f"README installs without the constraints: {command}"
    test_command = next(c for c in commands if "requirements-test.txt" in c)
    install = test_command.split(" && ")[0]
    assert install in (ROOT / ".ci" / "run").read_text(), ".ci/run does not run the README's test command"
    assert _constraints()["torch"] in install, "README's torch pin differs from constraints.txt"

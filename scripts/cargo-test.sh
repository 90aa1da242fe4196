#!/usr/bin/env bash
# `cargo test` as the suite runs it: every test binary runs even after one
# fails (so one red test does not hide the others), and a test that failed
# is run once more, alone. A test that passes alone is reported as FLAKY by
# name (the run stays green: these tests start real node workers and
# daemons on a machine that is running the other tests beside them, and a
# timing slip there is not a defect of the manager); a test that fails
# twice fails the suite. Arguments go to the first `cargo test`.
set -uo pipefail
cd "$(dirname "$0")/.."

out=$(mktemp)
trap 'rm -f "$out"' EXIT
cargo test --quiet --no-fail-fast "$@" 2>&1 | tee "$out"
[ "${PIPESTATUS[0]}" -eq 0 ] && exit 0

# The names under each "failures:" list, and the targets cargo names at the
# end ("`--test core`", "`--lib`").
mapfile -t names < <(awk '
  /^failures:$/ { inlist = 1; next }
  inlist && /^    [^ ]/ { sub(/^    /, ""); print; next }
  inlist && /^test result:/ { inlist = 0 }
' "$out" | sort -u)
mapfile -t targets < <(grep -o '`--[a-z]*\( [A-Za-z0-9_-]*\)\?`' "$out" | tr -d '`' | sort -u)
if [ ${#names[@]} -eq 0 ] || [ ${#targets[@]} -eq 0 ]; then
  echo "cargo test failed before any test could be named (a build error?)" >&2
  exit 1
fi
echo "==> running the ${#names[@]} failed test(s) once more, alone: ${names[*]}"
status=0
for t in "${targets[@]}"; do
  # shellcheck disable=SC2086 # a target is a flag and maybe a name
  cargo test --quiet $t -- --exact --test-threads=1 "${names[@]}" || status=1
done
if [ $status -eq 0 ]; then
  echo "FLAKY (failed once, passed alone): ${names[*]}"
fi
exit $status

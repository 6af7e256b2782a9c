#!/usr/bin/env bash
# Runs the cargo-fuzz targets of treasure_core one after the other, each for a bounded number of executions
# and/or a bounded time, and prints one line per target with the executions it passed.
#
#   rust/core/fuzz/run.sh [TARGET...]          (default: every target in fuzz_targets/)
#
#   FUZZ_RUNS=N       stop a target after N executions (libFuzzer -runs; default: no limit)
#   FUZZ_SECONDS=S    stop a target after S seconds (libFuzzer -max_total_time; default 60; 0 = no limit)
#   FUZZ_ARGS="..."   more libFuzzer flags (e.g. -jobs=4 -workers=4)
#   FUZZ_SANITIZER=S  cargo-fuzz's sanitizer (default address; none runs the target about twice as fast)
#   FUZZ_RESULTS=F    also append the result lines (TSV) to F
#
# `make chaos` runs it with the defaults (about a minute a target); the 10,000,000-execution runs recorded
# in docs/reliability.md are `FUZZ_RUNS=10000000 FUZZ_SECONDS=0 rust/core/fuzz/run.sh`. Needs the nightly
# toolchain and cargo-fuzz (`rustup toolchain install nightly`, `cargo install cargo-fuzz --locked`).
# A crash stops the script with exit 1 and leaves the reproducer in rust/core/fuzz/artifacts/TARGET/
# (replay it with `cargo +nightly fuzz run TARGET artifacts/TARGET/crash-...` from rust/core).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/.."   # rust/core: cargo fuzz finds ./fuzz

runs="${FUZZ_RUNS:--1}"
[ "$runs" = 0 ] && runs=-1   # libFuzzer: -runs=0 runs nothing, -1 is no limit
seconds="${FUZZ_SECONDS:-60}"
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  targets=()
  for f in "$here"/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: cargo-fuzz on the nightly toolchain is missing:" >&2
  echo "  rustup toolchain install nightly && cargo install cargo-fuzz --locked" >&2
  exit 2
fi

# The log_read target creates a directory per execution under $TMPDIR: keep that in memory when possible.
scratch="$(mktemp -d "$( [ -d /dev/shm ] && [ -w /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}" )/treasure-fuzz.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT

printf '%-12s %14s %9s %10s  %s\n' target executions seconds execs/s result
status=0
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  dict=()
  [ -f "fuzz/dicts/$t.dict" ] && dict=("-dict=fuzz/dicts/$t.dict")
  # Inputs that once failed (committed) are read as a second corpus: every run replays them first.
  regressions=()
  [ -d "fuzz/regressions/$t" ] && regressions=("fuzz/regressions/$t")
  log="$scratch/$t.log"
  start=$(date +%s)
  set +e
  # shellcheck disable=SC2086
  TMPDIR="$scratch" cargo +nightly fuzz run -s "${FUZZ_SANITIZER:-address}" "$t" "fuzz/corpus/$t" "${regressions[@]}" -- \
    -runs="$runs" -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix="fuzz/artifacts/$t/" "${dict[@]}" ${FUZZ_ARGS:-} >"$log" 2>&1
  rc=$?
  set -e
  took=$(( $(date +%s) - start ))
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | awk '{s += $2} END {print s + 0}')
  rate=$(( took > 0 ? execs / took : execs ))
  if [ "$rc" -eq 0 ]; then
    result=ok
  else
    result="FAILED (exit $rc)"
    status=1
  fi
  printf '%-12s %14s %9s %10s  %s\n' "$t" "$execs" "$took" "$rate" "$result"
  if [ -n "${FUZZ_RESULTS:-}" ]; then
    printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$execs" "$took" "$(date -u +%FT%TZ)" "$result" >>"$FUZZ_RESULTS"
  fi
  if [ "$rc" -ne 0 ]; then
    tail -40 "$log" >&2
    ls -1 "fuzz/artifacts/$t" >&2 || true
    exit "$status"
  fi
done
exit "$status"

#!/usr/bin/env bash
# Builds the core and tests/cpp with sanitizers and runs them with ctest.
#
#   tests/cpp/run_sanitizers.sh [SANITIZERS...]   (default: address,undefined thread)
#
# SANITIZERS is a value of TCPSTORE_BARRIER_SANITIZE. The options each
# sanitizer runs with (and tsan.supp) are set on the tests by
# tests/cpp/CMakeLists.txt. Environment: PYTHON (the interpreter whose torch
# to build against, default python3), SANITIZE_BUILD_ROOT (where the build
# dirs go, default a new temporary directory), JOBS (default 2).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=$(command -v "${PYTHON:-python3}")
build_root=${SANITIZE_BUILD_ROOT:-$(mktemp -d)}
if [ $# -eq 0 ]; then
  set -- address,undefined thread
fi

for sanitizers in "$@"; do
  build_dir="$build_root/sanitize-${sanitizers//,/-}"
  echo "== -DTCPSTORE_BARRIER_SANITIZE=$sanitizers in $build_dir"
  start=$SECONDS
  # A unity build: each source file parsing torch's headers again took most
  # of the time (74 s against 26 s here); the wheel's build still compiles
  # every file on its own, so a missing include is caught there.
  cmake -S "$root" -B "$build_dir" \
    -DCMAKE_UNITY_BUILD=ON \
    -DTCPSTORE_BARRIER_SANITIZE="$sanitizers" \
    -DTCPSTORE_BARRIER_BUILD_TESTS=ON \
    -DTCPSTORE_BARRIER_BUILD_PYTHON=OFF \
    -DPython_EXECUTABLE="$python" >/dev/null
  cmake --build "$build_dir" -j "${JOBS:-2}" >/dev/null
  echo "== built in $((SECONDS - start)) s"
  ctest --test-dir "$build_dir" --output-on-failure --no-tests=error
  echo "== $sanitizers: done in $((SECONDS - start)) s"
done

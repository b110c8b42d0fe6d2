#!/usr/bin/env bash
# The test suite: installs what it needs, then runs every test on HAProxy 2.6 and 2.8.
# Extra arguments go to pytest (e.g. ./test.sh -k authorize).
set -euo pipefail
cd "$(dirname "$0")"
./install-deps.sh
exec python3 -m pytest -q "$@"

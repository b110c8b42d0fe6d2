#!/usr/bin/env bash
# The test suite: installs what it needs (install-deps.sh), then runs every test. Tests of
# HAProxy's behaviour run on each supported branch (2.6, 2.8, 3.0, 3.2, 3.4); integration tests
# run on the agent double and on a real Consul agent (1.8.7). Extra arguments go to pytest
# (e.g. ./test.sh -k authorize).
set -euo pipefail
cd "$(dirname "$0")"
./install-deps.sh
exec python3 -m pytest -q "$@"

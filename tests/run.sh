#!/usr/bin/env bash
# Installs what is missing (apt-get), builds qmem's tests, benchmarks and examples on the host
# (CMake preset `dev`) and runs the tests with CTest. Exits non-zero when any test fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash .ci/install_deps.sh
cmake --workflow --preset dev

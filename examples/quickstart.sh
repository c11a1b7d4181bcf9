#!/usr/bin/env bash
# The main job: installs what is missing (apt-get), builds the quickstart example and runs it. It
# quantizes one tensor to every format qmem has and prints bits per parameter, the error and a
# dequantize/requantize round trip for each (examples/01_quickstart/main.cpp).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash .ci/install_deps.sh
cmake --preset dev >/dev/null
cmake --build --preset dev --target example_01_quickstart
./build/dev/examples/example_01_quickstart

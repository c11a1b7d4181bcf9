#!/usr/bin/env bash
# Installs, with apt-get, the Debian/Ubuntu packages qmem's build needs that are not installed yet
# (nothing when all are there). Extra package names given as arguments are added to the list.
# Runs apt-get as root, or through sudo when not root.
set -euo pipefail

qmem_packages=(cmake ninja-build g++ doctest-dev libbenchmark-dev nlohmann-json3-dev "$@")

qmem_missing=()
for pkg in "${qmem_packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    qmem_missing+=("$pkg")
  fi
done

if ((${#qmem_missing[@]} != 0)); then
  if ! command -v apt-get >/dev/null; then
    echo "qmem: missing packages: ${qmem_missing[*]} (no apt-get here: install them yourself)" >&2
    exit 1
  fi
  qmem_sudo=()
  if ((EUID != 0)); then
    if ! command -v sudo >/dev/null; then
      echo "qmem: missing packages: ${qmem_missing[*]}; run as root or install sudo" >&2
      exit 1
    fi
    qmem_sudo=(sudo)
  fi
  echo "qmem: installing ${qmem_missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${qmem_sudo[@]}" apt-get update -qq
  "${qmem_sudo[@]}" apt-get install -y -qq --no-install-recommends "${qmem_missing[@]}" >/dev/null
fi

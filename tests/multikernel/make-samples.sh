#!/usr/bin/env bash
# Regenerates tests/multikernel/samples/ from samples/requests.json with kerf 0.4.0 itself
# (see kerf_blob.py), plus an xxd hexdump and a dtc decompile of each blob.
# Needs /opt/kerf-venv (python3 -m venv /opt/kerf-venv && /opt/kerf-venv/bin/pip install
# kerf-multikernel==0.4.0) and, for the .dts files, dtc (apt-get install device-tree-compiler).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${KERF_PYTHON:-/opt/kerf-venv/bin/python}"
cd "$here/samples"
"$py" "$here/kerf_blob.py" --batch requests.json 2>/dev/null | tee results.jsonl
for f in *.dtb *.dtbo; do
  xxd "$f" > "$f.hex"
  if command -v dtc >/dev/null; then dtc -I dtb -O dts "$f" > "$f.dts" 2>/dev/null; fi
done
sha256sum *.dtb *.dtbo > SHA256SUMS

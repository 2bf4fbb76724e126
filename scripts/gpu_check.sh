#!/usr/bin/env bash
# The device check in one command (benchmarks/gpu_check.py says what it runs):
#     bash scripts/gpu_check.sh --out "$OUT"
# A machine without network may lack a small package this project needs: put its wheels in
# ./wheels (or $WHEELS) next to the checkout and they are installed, offline, before the check.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-wheels}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    python3 -m pip install --quiet --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
fi
exec python3 -m benchmarks.gpu_check "$@"

#!/usr/bin/env bash
# Creates .venv (Python 3.11) with everything from requirements.txt, a Java runtime for METEOR, and
# .cache/wheels/ with the torchxrayvision wheel whose annotation files the tests read.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# Real annotation files (NIH, RSNA, SIIM, IU X-ray reports) that some tests read: the torchxrayvision
# wheel, downloaded once and never installed (tests skip, naming it, where it is absent).
XRV=.cache/wheels/torchxrayvision-1.5.7-py3-none-any.whl
if [ ! -f "$XRV" ]; then
  .venv/bin/python -m pip download -q --no-deps torchxrayvision==1.5.7 -d .cache/wheels \
    || echo "[setup] WARNING: could not download the torchxrayvision wheel: tests that read its files skip" >&2
fi
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing a Java runtime for METEOR (default-jre-headless)"
    apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null
  else
    echo "[setup] WARNING: no java on PATH: METEOR will be reported as missing (install a JRE)" >&2
  fi
fi

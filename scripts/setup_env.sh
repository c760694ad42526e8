#!/usr/bin/env bash
# Creates .venv (Python 3.11) with everything from requirements.txt, and a Java runtime for METEOR.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
if ! command -v java >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing a Java runtime for METEOR (default-jre-headless)"
    apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null
  else
    echo "[setup] WARNING: no java on PATH: METEOR will be reported as missing (install a JRE)" >&2
  fi
fi

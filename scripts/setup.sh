#!/usr/bin/env bash
# Set up semlens_fast on a fresh machine (system Python, no venv needed).
#   scripts/setup.sh          # runtime + test + benchmark dependencies, builds the C++ kernels
# Idempotent: re-running only re-installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore

# Offline data used by the demo and the tests (Fashion-MNIST, English text). Optional:
# everything falls back to scikit-learn's digits when it is absent.
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    if ! dpkg -s dataset-fashion-mnist fortunes >/dev/null 2>&1; then
        apt-get update -qq || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist fortunes >/dev/null || \
            echo "setup: apt-get could not install dataset-fashion-mnist/fortunes; continuing without them" >&2
    fi
    # headless Chromium for the browser tests of the HTML report and of `semlens serve` (driven by
    # Playwright with executable_path=/usr/bin/chromium; skipped without it unless SEMLENS_REQUIRE_BROWSER=1)
    if ! dpkg -s chromium >/dev/null 2>&1; then
        apt-get update -qq || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
            echo "setup: apt-get could not install chromium; the report's browser test will be skipped" >&2
    fi
fi

# torch first: these exact releases come from local files on the reference machine.
python -m pip install -q torch==2.14.1 torchvision==0.29.1
# the package (builds semlens_fast._C in place) with its test and benchmark extras: captum (the
# relevance evaluation's baselines) and the serve extra (FastAPI, uvicorn, Jinja2, python-multipart;
# httpx, playwright). Playwright's browser download (`playwright install`) is never run: the tests
# use the system Chromium.
python -m pip install -q -e ".[test,bench]"
# dl-backtrace, the relevance peer: it pins torch 2.6 and TensorFlow, so it goes in without its
# dependencies, plus the few modules it imports (its agreement tests run in a subprocess).
python -m pip install -q --no-deps dl-backtrace==0.1.24
python -m pip install -q lz4 seaborn zstandard graphviz threadpoolctl matplotlib ipython
python - <<'PY'
import semlens_fast, semlens_fast.ops as ops
import captum  # the relevance evaluation's baselines (semlens_fast.evaluate)
print(f"semlens_fast {semlens_fast.__version__} ready; CPU kernels: {ops.cpu_isa()}; captum {captum.__version__}")
PY

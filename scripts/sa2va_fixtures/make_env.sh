#!/usr/bin/env bash
# Create the pinned virtual environment in which make_fixtures.py runs Sa2VA's own Hub code.
#
# Sa2VA's InternVL2.5-era checkpoints (Qwen2 and InternLM2 language models) run with its "legacy" pins:
# transformers 4.49.0 and peft 0.11.1 (Sa2VA's pyproject.toml). The venv sees this machine's CPU torch through
# --system-site-packages and shadows the newer transformers, tokenizers and huggingface_hub there. torchvision is
# not installed: the PyPI build does not load beside a CPU torch it was not built for, and Sa2VA only uses a few of
# its PIL transforms (and timm only for an identity DropPath), which make_fixtures.py provides from standins/.
#
# Usage: scripts/sa2va_fixtures/make_env.sh [VENV_DIR]   (default .venv-sa2va-fixtures in the repository root)
set -euo pipefail
VENV_DIR="${1:-$(cd "$(dirname "$0")/../.." && pwd)/.venv-sa2va-fixtures}"
python3 -m venv --system-site-packages "$VENV_DIR"
"$VENV_DIR/bin/pip" install --quiet \
    "transformers==4.49.0" \
    "peft==0.11.1" \
    "tokenizers==0.21.1" \
    "huggingface_hub==0.29.3" \
    "accelerate==1.4.0" \
    "einops==0.8.1"
"$VENV_DIR/bin/python" -c "import transformers, peft, torch; print('sa2va fixture env:', transformers.__version__, peft.__version__, torch.__version__)"

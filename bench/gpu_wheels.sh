#!/usr/bin/env bash
# Download the wheels bench/gpu_report.py needs on a GPU machine that has torch but cannot download anything
# (bench/gpu_report_requirements.md says why each is needed). The versions are the ones this project is tested with;
# the machine's own torch, numpy, pillow, pyyaml, tqdm, accelerate and psutil are kept.
#
#     bash bench/gpu_wheels.sh [DEST] [PYTHON_VERSION]     # defaults: .whl 3.12
#
# On the GPU machine, from the repository root, install them beside (not over) its packages and run the report:
#
#     python3 -m pip install -q --no-index --no-deps --target /tmp/site DEST/*.whl
#     PYTHONPATH=/tmp/site:. python3 bench/gpu_report.py
set -euo pipefail

dest="${1:-.whl}"
python_version="${2:-3.12}"
if [[ ! "$python_version" =~ ^3\.[0-9]+$ ]]; then
    echo "gpu_wheels.sh: PYTHON_VERSION must look like 3.12, got '$python_version'." >&2
    exit 2
fi

wheels=(
    transformers==5.25.0
    huggingface_hub==2.4.0
    tokenizers==0.23.3
    peft==0.21.2
    # huggingface_hub 2.4's own needs, newer than what a torch image usually holds
    httpx2==2.17.0
    httpcore2==2.17.0
    hf-xet==1.8.0
    click==8.5.1
    truststore==0.10.5
    anyio==4.16.0
    idna==3.20
    h11==0.16.0
    typing_extensions==4.16.0
    # transformers 5.25 requires kernels, and kernels requires tomlkit
    kernels==0.19.1
    tomlkit==0.15.3
)

mkdir -p "$dest"
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest" \
    --python-version "$python_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    "${wheels[@]}"
echo "gpu_wheels.sh: ${#wheels[@]} wheels for Python $python_version in $dest ($(du -sh "$dest" | cut -f1))."

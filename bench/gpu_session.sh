#!/usr/bin/env bash
# Every GPU measurement of bench/README.md, in three parts that each fit a 10-minute call on one H100:
#
#   bash bench/gpu_session.sh 1    # CUDA-only tests; training step: ours vs textbook vs smp, fast paths
#   bash bench/gpu_session.sh 2    # torch.compile, and the headline: 10 epochs of training.py (data cache), MFU
#   bash bench/gpu_session.sh 3    # 1 epoch with loader workers instead, data loading, inference, layout
#
# Each script runs with --record, which writes its raw block to bench/records/ and a row to bench/README.md; at
# the end the updated bench/README.md, bench/records/ (as one archive) and the whole log are copied to $OUT (the
# device tool's folder that comes back), or to bench/out/ without it. A failing script is reported and the next one still runs.
# It first checks that the runtime and test packages import, and stops if one does not.
# segmentation_models_pytorch (the smp row; it needs timm, huggingface_hub and safetensors, which the
# H100 image has) is installed from wheels in .whl/ when present, for a machine with no package index:
# `pip download --no-deps -d .whl segmentation-models-pytorch==0.6.0` beforehand, and name .whl in the
# device tool's `carry` (it is git-ignored). Without it the smp row is left out, with a line saying so.
# DRY_RUN=1 checks the plumbing on a CPU in a few minutes: tiny sizes, nothing recorded.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?usage: bash bench/gpu_session.sh 1|2|3}
if [[ ${DRY_RUN:-0} == 1 ]]; then
    device=cpu batch=2 size=64x32 images=4 epochs=1 repeats=1 base=8 raw_images=10 photos=2 record=()
else
    device=cuda batch=32 size=512x256 images=2975 epochs=10 repeats=10 base=64 raw_images=160 photos=64
    record=(--record)
fi
out=${OUT:-bench/out}
mkdir -p "$out"
log="$out/gpu_session_$part.log"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/bench_site .whl/*.whl &&
        export PYTHONPATH=/tmp/bench_site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch, torchvision, numpy, PIL, matplotlib, tqdm, pytest" 2>&1 | tee -a "$log" ||
    { echo "missing packages: see above" | tee -a "$log"; exit 1; }
smp=$(python3 -c "import segmentation_models_pytorch" 2>/dev/null && echo smp)
[[ -n $smp ]] || echo "segmentation_models_pytorch does not import: the smp row is left out" | tee -a "$log"

bench() {
    echo "+ python3 -m $*" | tee -a "$log"
    python3 -m "$@" "${record[@]}" 2>&1 | tee -a "$log" || echo "FAILED (exit ${PIPESTATUS[0]}): $*" | tee -a "$log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee -a "$log"
common=(--device "$device" --batch_size "$batch" --image_size "$size" --base_channels "$base")
case $part in
1)
    tests=(-m pytest -q -p no:cacheprovider tests/test_training.py tests/test_metrics.py tests/test_device_cache.py
           -k cuda)
    [[ $device == cuda ]] || tests+=(--collect-only)  # a dry run only checks that they are found
    echo "+ python3 ${tests[*]}" | tee -a "$log"
    python3 "${tests[@]}" 2>&1 | tee -a "$log" || echo "FAILED (exit ${PIPESTATUS[0]}): CUDA-only tests" | tee -a "$log"
    bench bench.train_step "${common[@]}" --repeats "$repeats" --candidates ours textbook $smp
    bench bench.train_step "${common[@]}" --repeats "$repeats" --candidates ours --cudnn_benchmark off
    bench bench.fast_paths "${common[@]}" --repeats "$repeats" --steps_per_call 5
    ;;
2)
    bench bench.train_step "${common[@]}" --repeats "$repeats" --candidates ours --compile
    bench bench.epoch --device "$device" --batch_size "$batch" --train_images "$images" --epochs "$epochs" \
        --compile --data_cache device
    ;;
3)
    bench bench.epoch --device "$device" --batch_size "$batch" --train_images "$images" --epochs 1 --compile
    bench bench.data_loading --num_workers 8 --batch_size 8 --base_channels "$base" --num_images "$raw_images" \
        --repeats 3 --cache_device "$device"
    bench bench.inference_speed --device "$device" --base_channels "$base" --batch_size 16 --num_workers 8 \
        --num_images "$photos" --repeats "$repeats"
    bench bench.layout --device "$device" --batch_sizes 8 "$batch" --image_size "$size" --base_channels "$base" \
        --repeats "$repeats"
    ;;
*)
    echo "usage: bash bench/gpu_session.sh 1|2|3" >&2
    exit 2
    ;;
esac
cp bench/README.md "$out/bench_README.md"
tar -czf "$out/bench_records.tar.gz" bench/records  # the raw blocks --record wrote (one file each)

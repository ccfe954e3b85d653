#!/usr/bin/env bash
# Every GPU measurement of issue #20 (memory plan, gradient checkpointing, the fair transformers+peft
# anchors), in phases that each fit one 600-second call of a GPU host with no package registry.
# Run from the checkout's root; results go to $OUT (JSON + logs). On a fresh host, in this order:
#
#   bench/gpu_memory_session.sh stage              # with .gpu-a/ (../shared/gpu/README.md): MLX's CUDA wheel, part 1
#   bench/gpu_memory_session.sh install bench-off  # with .gpu-b/ and .gpu-c/: part 2, pydantic-settings and
#                                                  # python-dotenv; then train_gpu.py, checkpointing off for all,
#                                                  # ft first: its first step compiles MLX's kernels (first-run figure)
#   bench/gpu_memory_session.sh memory             # memory_plan.py: QLoRA on the Mistral-7B shape, plan vs peaks
#   bench/gpu_memory_session.sh bench-on           # train_gpu.py, checkpointing on for all
#   bench/gpu_memory_session.sh ft-limits          # ft with and without the memory limit ft train sets
#
# Several phases in one call run in the order given.
set -uo pipefail
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
STEPS=${STEPS:-60}
RECORDS=${RECORDS:-480}

bench_off() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
  timeout 540 python3 bench/train_gpu.py --engines ft,hf_eager,hf_sdpa,hf_sdpa_grouped \
    --steps "$STEPS" --records "$RECORDS" --json-out "$out/train_off.json" 2>&1 | tee "$out/train_off.txt"
}

for phase in "$@"; do
case "$phase" in
  stage)
    mkdir -p /root/gpu && cp .gpu-a/* /root/gpu/ && ls /root/gpu
    ;;
  install)
    cp .gpu-b/* .gpu-c/* /root/gpu/ || exit 1
    (cd /root/gpu && cat cuda.part.* >"$(cat CUDA_WHEEL_NAME)" && rm cuda.part.* \
      && python3 -m pip install -q --no-index --no-deps --no-compile ./*.whl) || exit 1
    python3 -c 'import mlx.core as mx; print(mx.default_device(), mx.device_info())' | tee "$out/device.txt"
    ;;
  bench-off)
    bench_off
    ;;
  memory)
    # off/on = without/with checkpointing (onK: the last K blocks not recomputed; on = ft's default);
    # plan = the limit ft train sets, none = MLX's default, min = every kernel waits (the step's own need).
    timeout 560 python3 bench/memory_plan.py --shape mistral7b --method qlora --shapes 1x2048,2x2048 \
      --steps 6 --variants off:plan,on:plan,off:none,on:none,on0:plan,on2:plan,on0:none,off:min,on:min \
      --json-out "$out/memory.json" 2>&1 | tee "$out/memory.txt"
    ;;
  bench-on)
    timeout 560 python3 bench/train_gpu.py --engines ft+ckpt,hf_eager+ckpt,hf_sdpa+ckpt,hf_sdpa_grouped+ckpt \
      --steps "$STEPS" --records "$RECORDS" --json-out "$out/train_on.json" 2>&1 | tee "$out/train_on.txt"
    ;;
  ft-limits)
    # ft alone: with checkpointing (the limit ft train sets), then both without the limit (MLX's default)
    timeout 300 python3 bench/train_gpu.py --engines ft+ckpt --steps "$STEPS" --records "$RECORDS" \
      --json-out "$out/ft_ckpt.json" 2>&1 | tee "$out/ft_ckpt.txt"
    timeout 200 python3 bench/train_gpu.py --engines ft,ft+ckpt --ft-memory-limit none --steps "$STEPS" \
      --records "$RECORDS" --json-out "$out/ft_nolimit.json" 2>&1 | tee "$out/ft_nolimit.txt"
    ;;
  *)
    echo "usage: $0 stage|install|bench-off|memory|bench-on|ft-limits" >&2
    exit 2
    ;;
esac
done

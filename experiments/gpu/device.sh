#!/usr/bin/env bash
# The GPU quarter hour in one call of under 10 minutes: everything this project still has to measure on a
# lent H100/H200, in priority order. Prepare on the CPU first, from the project root:
#   bash ../shared/gpu/prepare.sh            # .device/: wheels, Tiny Shakespeare, tiktoken cache, env.sh
#   mkdir -p .device/llm.c && git --git-dir=/PATH/TO/llm.c/.git archive f1e2ace | tar -x -C .device/llm.c
#                                            # karpathy/llm.c at the commit gpt2/benchmark/peers_llmc.py was read from
# then the device tool's run with carry [".device"] and timeout_s 590:
#   bash experiments/gpu/device.sh $OUT
# 1. gpt2.bench (environment, the CUDA tests, every stage of +sweep=speedup_full, the peers llm.c and
#    transformers on the same card, the micro-batch scan) into OUT/bench, under its own budget
# 2. fp8-head against big-batch, one after the other in one multirun: does the FP8 classifier pay?
# 3. big-batch with Inductor's coordinate-descent tuning (train.compile_options), against the same big-batch
# 4. flash4 against big-batch, only where flash-attn-4 imports: its wheels do not fit the 64 MiB carry
#    (nvidia-cutlass-dsl-libs alone is 92 MB), so a machine without it skips this part and says so
# Commit what comes back under experiments/<gpu>-speedup/ with this command, the GPU, driver, torch and CUDA.
set -u
out=${1:?usage: device.sh OUT}
source .device/env.sh || exit 1
data=.device/tinyshakespeare.txt
mkdir -p "$out"
llmc=(); [ -f .device/llm.c/train_gpt2.cu ] && llmc=(--llmc .device/llm.c)

timeout 420 python3 -m gpt2.bench --out "$out/bench" --data $data --budget-s 400 "${llmc[@]}"
echo "== bench exit $?"; tail -40 "$out/bench/bench.md" 2>/dev/null

if [ -f conf/stage/fp8-head.yaml ]; then
  timeout 150 python3 run.py -m +stage=big-batch,fp8-head data.path=$data train.steps=12 train.timing_skip=4 \
      train.save_checkpoints=false hydra.sweep.dir="$out/fp8" > "$out/fp8.log" 2>&1
  echo "== fp8-head exit $?"; grep -E "^\| [0-9]" "$out/fp8/report.md" 2>/dev/null || tail -20 "$out/fp8.log"
fi

timeout 150 python3 run.py -m +stage=big-batch data.path=$data train.steps=12 train.timing_skip=4 \
    train.save_checkpoints=false '+train.compile_options={},{coordinate_descent_tuning:true}' \
    hydra.sweep.dir="$out/autotune" > "$out/autotune.log" 2>&1   # job 0: Inductor defaults, job 1: tuned
echo "== coordinate-descent tuning exit $?"; grep -E "^\| [0-9]" "$out/autotune/report.md" 2>/dev/null || tail -20 "$out/autotune.log"

if python3 -c "import flash_attn.cute" 2>/dev/null; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_flash4.py -k real_kernel > "$out/flash4_test.log" 2>&1
  echo "== flash4 kernel vs SDPA exit $?"; tail -3 "$out/flash4_test.log"
  timeout 150 python3 run.py -m +stage=big-batch,flash4 data.path=$data train.steps=12 train.timing_skip=4 \
      train.save_checkpoints=false hydra.sweep.dir="$out/flash4" > "$out/flash4.log" 2>&1
  echo "== flash4 exit $?"; grep -E "^\| [0-9]" "$out/flash4/report.md" 2>/dev/null || tail -20 "$out/flash4.log"
else
  echo "== flash4 skipped: flash_attn.cute does not import here (pip install --pre flash-attn-4)"
fi
ls "$out"

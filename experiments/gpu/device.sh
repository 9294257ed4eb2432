#!/usr/bin/env bash
# The GPU quarter hour in one call of under 10 minutes: everything this project still has to measure on a
# lent H100/H200, in priority order. Prepare on the CPU first, from the project root:
#   bash ../shared/gpu/prepare.sh            # .device/: wheels, Tiny Shakespeare, tiktoken cache, env.sh
#   mkdir -p .device/llm.c && git --git-dir=/PATH/TO/llm.c/.git archive f1e2ace | tar -x -C .device/llm.c
#                                            # karpathy/llm.c at the commit gpt2/peers_llmc.py was read from
# then the device tool's run with carry [".device"] and timeout_s 590:
#   bash experiments/gpu/device.sh $OUT
# 1. gpt2.bench (environment, the CUDA tests, every stage of +sweep=speedup_full, the peers llm.c and
#    transformers on the same card, the micro-batch scan) into OUT/bench, under its own budget
# 2. fp8-head against big-batch, one after the other in one multirun: does the FP8 classifier pay?
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
ls "$out"

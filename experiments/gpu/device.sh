#!/usr/bin/env bash
# The GPU quarter hour in one call of under 10 minutes: everything this project still has to measure on a
# lent H100/H200. Prepare on the CPU first, from the project root:
#   bash ../shared/gpu/prepare.sh            # .device/: wheels, Tiny Shakespeare, tiktoken cache, env.sh
#   mkdir -p .device/llm.c && git --git-dir=/PATH/TO/llm.c/.git archive f1e2ace | tar -x -C .device/llm.c
#                                            # karpathy/llm.c at the commit gpt2/benchmark/peers_llmc.py was read from
# then the device tool's run with carry [".device"] and timeout_s 590:
#   bash experiments/gpu/device.sh $OUT
# One gpt2.bench into OUT/bench, in priority order under its own budget: the environment, the CUDA tests
# (tests/test_cuda.py, and the flash4 kernel against SDPA where flash-attn-4 imports), every stage of
# +sweep=speedup_full, the candidates beside big-batch (fp8-head, flash4, coordinate-descent tuning: see
# experiments/gpu/PREDICTIONS.md for what each should gain), the peers llm.c and transformers on the same
# card, the micro-batch scan. flash4 is refused in one line where its package is absent: its wheels do not fit
# the 64 MiB carry (nvidia-cutlass-dsl-libs alone is 92 MB).
# Commit what comes back under experiments/<gpu>-speedup/ with this command, the GPU, driver, torch and CUDA,
# and fill in PREDICTIONS.md's outcomes.
set -u
out=${1:?usage: device.sh OUT}
source .device/env.sh || exit 1
data=.device/tinyshakespeare.txt
mkdir -p "$out"
llmc=(); [ -f .device/llm.c/train_gpt2.cu ] && llmc=(--llmc .device/llm.c)

timeout 570 python3 -m gpt2.bench --out "$out/bench" --data $data --budget-s 540 "${llmc[@]}"
echo "== bench exit $?"; tail -60 "$out/bench/bench.md" 2>/dev/null
ls "$out"

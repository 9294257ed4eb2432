#!/usr/bin/env bash
# Everything this project measures on one lent GPU, in one call of under 10 minutes (see README.md here).
# From the project root on the device machine, after ../shared/gpu/prepare.sh readied .device/ here:
#   bash experiments/h200-speedup/device.sh $OUT
# 1. gpt2.bench: environment, the CUDA tests, every stage of +sweep=speedup_full (into OUT/bench)
# 2. where one step of the last stage spends its GPU time (experiments/profile/step_profile.py)
# 3. the classifier + loss alone: plain, fused, compiled, Liger-Kernel (experiments/fused_loss/bench.py)
# 4. validation and HellaSwag inside a compiled bf16 run: no crash, no recompilation storm
set -u
out=${1:?usage: device.sh OUT}
source .device/env.sh || exit 1
data=.device/tinyshakespeare.txt
last=big-batch  # the last stage (the 2026-11-27 run used big-batch + train.sdpa_backend=cudnn, then a stage)
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/extra/*.whl 2>&1 | tail -1

timeout 360 python3 -m gpt2.bench --out "$out/bench" --data $data --budget-s 330
echo "== bench exit $?"

timeout 90 python3 experiments/profile/step_profile.py --out "$out/profile" +stage=$last data.path=$data \
    > "$out/profile.log" 2>&1
echo "== profile exit $?"; tail -14 "$out/profile.log"

timeout 75 python3 experiments/fused_loss/bench.py --rows 65536 --reps 10 --out "$out/fused_loss" \
    > "$out/fused_loss.log" 2>&1
echo "== fused_loss exit $?"; tail -9 "$out/fused_loss.log"

# HellaSwag-format rows made from the text (the real file needs the network): this checks that the
# evaluations run in a compiled bf16 run and how often dynamo recompiles, not the score
python3 - "$data" "$out/hellaswag_rows.jsonl" <<'PY'
import json, random, sys
lines = [l.strip() for l in open(sys.argv[1]) if len(l.strip()) > 20]
rng = random.Random(0)
with open(sys.argv[2], "w") as f:
    for i in range(200):
        ctx, *ends = rng.sample(lines, 5)
        f.write(json.dumps({"ind": i, "ctx": ctx, "endings": ends, "label": rng.randrange(4)}) + "\n")
PY
TORCH_LOGS=recompiles timeout 80 python3 run.py +stage=$last data.path=$data hydra.run.dir="$out/evals" \
    train.steps=4 train.total_batch_size=65536 train.val_every=2 train.val_batches=4 train.hellaswag_every=2 \
    train.hellaswag_data="$out/hellaswag_rows.jsonl" train.save_checkpoints=false train.timing_skip=1 \
    > "$out/evals.log" 2>&1
echo "== evals exit $? ; recompiles: $(grep -c -i 'recompiling' "$out/evals.log")"
grep -E "val loss|hellaswag|tok/s" "$out/evals.log" | tail -8

tar -czf "$out/all.tar.gz" -C "$out" --exclude=all.tar.gz --exclude=bench .
ls "$out"

#!/usr/bin/env bash
# Prove the GPU fine-tuning path on one node with 2 GPUs (H200/H100): Megatron-Core's DDP, distributed
# optimizer, LR scheduler and forward-backward schedule with CP=2 TASP attention, a checkpoint, and an
# exact resume from it.
#
#   scripts/gpu_finetune_check.sh              # outputs under $OUT (if set) or runs/gpu-finetune-check
#   STEPS=6 MORE=4 REFERENCE=0 scripts/gpu_finetune_check.sh   # REFERENCE=0: skip the uninterrupted run
#
# Needs torch with CUDA and megatron-core 0.19 importable (Transformer Engine / apex not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-runs}/gpu-finetune-check"
steps="${STEPS:-6}"
more="${MORE:-4}"
recipe=configs/recipes/gpt-403m-h200x2-cp2.yaml
run() {
  python -m torch.distributed.run --standalone --nproc-per-node 2 -m megatron_tasp.cli finetune "$recipe" \
    "logging.output_dir=$out" "data.cache_dir=$out/data_cache" train.eval_interval=0 train.eval_batches=2 \
    "$@"
}
rm -rf "$out" "$out.reference"
mkdir -p "$(dirname "$out")"
echo "== first run: $steps steps, CP=2, checkpoint at the end"
run --max-steps "$steps" checkpoint.resume=never 2>&1 | tee "$out.first.log"
test "$(cat "$out/checkpoints/latest")" = "$steps"
echo "== resume from step $steps for $more more"
run --max-steps "$((steps + more))" checkpoint.resume=auto 2>&1 | tee "$out.resume.log"
test "$(cat "$out/checkpoints/latest")" = "$((steps + more))"
if [[ "${REFERENCE:-1}" == 1 ]]; then
  echo "== reference: $((steps + more)) steps uninterrupted"
  out_ref="$out.reference"
  python -m torch.distributed.run --standalone --nproc-per-node 2 -m megatron_tasp.cli finetune "$recipe" \
    "logging.output_dir=$out_ref" "data.cache_dir=$out/data_cache" train.eval_interval=0 train.eval_batches=2 \
    --max-steps "$((steps + more))" checkpoint.save=false checkpoint.resume=never 2>&1 | tee "$out_ref.log"
fi
python - "$out/metrics.json" "$steps" "$more" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
steps, more = int(sys.argv[2]), int(sys.argv[3])
assert m["resumed_from"] and m["end_step"] == steps + more and m["cp"] == 2, m
assert [s["step"] for s in m["steps"]] == list(range(1, steps + more + 1)), [s["step"] for s in m["steps"]]  # after N steps
losses = [round(s["loss"], 4) for s in m["steps"]]
try:
    ref = [s["loss"] for s in json.load(open(sys.argv[1].replace("/metrics.json", ".reference/metrics.json")))["steps"]]
    print(f"resumed vs uninterrupted: max |loss difference| {max(abs(a['loss'] - b) for a, b in zip(m['steps'], ref)):.2e}")
except OSError:
    pass
print(f"ok: {m['device']}, cp {m['cp']} dp {m['dp']}, losses {losses}, "
      f"{m['mean_tokens_per_s']:,.0f} tokens/s, peak memory {m.get('max_memory_allocated_gib', 0):.1f} GiB")
PY

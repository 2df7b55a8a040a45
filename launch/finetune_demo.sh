#!/usr/bin/env bash
# Fine-tuning on the demo, CPU, minutes: the demo encoder (configs/pp.py:demo, pretrained here unless ENCODER names a
# workdir) fine-tuned end to end with the AudioSet head on the demo corpus's 8 classes (configs/finetune_as.py:demo),
# against the same head trained on the frozen encoder and the whole model trained from scratch; every run evaluated
# on the 800 held-out clips (mAP, AUC, d' with bootstrap 95 % CIs), one table at the end.
#   bash launch/finetune_demo.sh /tmp/finetune_demo
set -euo pipefail
out=${1:-/tmp/finetune_demo}
PY=${PYTHON:-python}
enc=${ENCODER:-$out/pretrain}
cd "$(dirname "$0")/.."
if [ ! -d "$enc/checkpoints" ]; then
  $PY -m matpac_jax.main --config=configs/pp.py:demo --workdir="$enc"
fi
ft=(-m matpac_jax.main --config=configs/finetune_as.py:demo)
$PY "${ft[@]}" --workdir="$out/finetuned" --config.finetune.init_from="$enc"
$PY "${ft[@]}" --workdir="$out/frozen" --config.finetune.init_from="$enc" --config.finetune.freeze_encoder=True
$PY "${ft[@]}" --workdir="$out/scratch"
$PY - "$out" <<'PY'
import json, sys
out = sys.argv[1]
print("| encoder | mAP | AUC | d' |  (value [95 % CI], 800 held-out clips)\n|---|---|---|---|")
for name in ("finetuned", "frozen", "scratch"):
    r = json.load(open(f"{out}/{name}/eval.json"))
    print(f"| {name} | " + " | ".join(f"{r[k][0]:.4f} [{r[k][1]:.4f}, {r[k][2]:.4f}]" for k in ("mAP", "AUC", "d_prime"))
          + " |")
PY

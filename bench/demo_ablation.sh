#!/usr/bin/env bash
# The demo's unseen-class figures with and without the domain-adversarial loss, side by side.
# Runs `make demo` (if its results are missing) and the same recipe with --domain_loss_ratio 0.
#   bash bench/demo_ablation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f runs/demo/eval/results.json ] || make demo
make demo DEMO_RUN=runs/demo_dlr0 EXTRA_TRAIN_ARGS="--domain_loss_ratio 0"
.venv/bin/python - <<'PY'
import json
runs = {"demo recipe": "runs/demo", "--domain_loss_ratio 0": "runs/demo_dlr0"}
print(f"{'run':24s} {'mAP@all':>8s} {'P@100':>8s} {'mAP@200':>8s} {'P@200':>8s} {'untrained':>10s} {'chance':>8s}")
for name, path in runs.items():
    r = json.load(open(f"{path}/eval/results.json"))
    print(f"{name:24s} {r['map_all']:8.4f} {r['p@100']:8.4f} {r['map@200']:8.4f} {r['p@200']:8.4f} "
          f"{r['untrained']['map_all']:10.4f} {r['chance_map_all']:8.4f}")
PY

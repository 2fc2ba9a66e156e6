#!/usr/bin/env bash
# The project's GPU checks in one command, within 8 minutes on one H200, ending in one summary table.
#
#   bash bench/gpu_check.sh [--wheels DIR] [--emoji DIR] [--out DIR] [--python PY]   # on a machine with a GPU
#   bash bench/gpu_check.sh --dry-run              # every step on this CPU at tiny sizes: tests the script only
#   bash bench/gpu_check.sh --fetch-wheels DIR     # here (needs a package index): the optional packages as wheels
#
# Steps, each timed, none stopping the next (the exit status is 1 when any failed):
#   setup        gdown, py7zr, open_clip (imported lazily; no gpu-marked test needs them) installed from --wheels
#                (default wheels/ if present) into a venv over the machine's python3, with --no-index
#   gpu tests    pytest -m gpu over tests/
#   bench data   demo_data.py: 47 classes x 40 sketches (PNG) + 40 photos (JPEG) at 256 px, in a temporary folder
#   bench X      bench/bench_train.py --recipe original --backbone X --image_size 224 --batch_size 64 (triplets),
#                20 timed batches, 50-step loop epochs; X = vgg16, resnet50
#   sketch_lvm   train.py --recipe sketch_lvm_clip_vit_b32 (Sketch_LVM's method, methods.SketchLVM) on random CLIP
#                weights, the bench data at 224 px in batches of 192 triplets, 1 epoch; then evaluate.py on it (needs
#                open_clip: setup). Random weights learn next to nothing: this checks that the method runs on a GPU
#   zse_sbir     train.py --recipe zse_sbir_vit_b16 (ZSE-SBIR's method, methods.ZSESBIR) on random weights, the bench
#                data at 224 px, 60 quadruplets; then evaluate.py --score relation on it, which prints its pairs/s
#   emoji train  train.py on emoji-dev at 128 px, --no-pretrained, --budget_minutes 3 (less if time runs short)
#   emoji eval   evaluate.py on its best.pth: unseen-class mAP@all
# Writes to --out (default $OUT if set, else runs/gpu_check): gpu_check.log, summary.txt, emoji_eval.json,
# emoji_train_log.jsonl. Everything else lives in a temporary folder that is removed at the end.
#
# With the device tool (its machine has no network): here, once,
#   bash /work/shared/bench/emoji-dev/build.sh data/emoji-dev   # about a minute, 51.8 MiB (data/ is git-ignored)
#   bash bench/gpu_check.sh --fetch-wheels wheels               # 6.9 MiB; checks the carry total against 64 MiB
# then run(command="bash bench/gpu_check.sh", carry=["wheels", "data/emoji-dev"], timeout_s=540): 61.9 MiB carried
# with the 3.3 MiB working tree; the script cuts itself off at 7.7 minutes, so 540 s leaves room for the summary.
# Where .git does not travel, prefix the command with GIT_COMMIT=<hash> to name the commit in the summary.
set -u
cd "$(dirname "$0")/.." || exit 1

WHEEL_PY=${WHEEL_PY:-3.12}  # the H200 image's python3 is 3.12.3 (KINDS.md of the device tool)
# The optional packages and those of their needs that the H200 image lacks (its package list in KINDS.md);
# timm, huggingface-hub, safetensors, regex, requests, psutil and tqdm are there.
WHEEL_PKGS="gdown beautifulsoup4 soupsieve PySocks py7zr texttable pycryptodomex backports.zstd brotli inflate64
            multivolumefile pybcj pyppmd open_clip_torch ftfy wcwidth"
CARRY_LIMIT=$((64 * 1024 * 1024))
SKIP=99  # a step function's status for "skipped"

usage() { sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "$1"; }
DRY=false OUTDIR=${OUT:-runs/gpu_check} WHEELS="" EMOJI="" PY=${PYTHON:-python3} FETCH=""
[ -d wheels ] && WHEELS=wheels
[ -d data/emoji-dev ] && EMOJI=data/emoji-dev
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=true; shift ;;
    --out|--wheels|--emoji|--python|--fetch-wheels)
      [ $# -ge 2 ] || { echo "error: $1 needs a value" >&2; exit 2; }
      case $1 in --out) OUTDIR=$2 ;; --wheels) WHEELS=$2 ;; --emoji) EMOJI=$2 ;; --python) PY=$2 ;; *) FETCH=$2 ;; esac
      shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for d in "$WHEELS" "$EMOJI"; do [ -z "$d" ] || [ -d "$d" ] || { echo "error: no folder $d" >&2; exit 2; }; done

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
fetch_wheels() {  # pip download for the GPU machine's python, then the carry budget
  mkdir -p "$FETCH" || exit 1
  # shellcheck disable=SC2046,SC2086
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$WHEEL_PY" --implementation cp \
    $(printf -- '--platform manylinux_2_%s_x86_64 ' 5 12 17 24 27 28 31 34 35) --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$FETCH" $WHEEL_PKGS || { echo "error: pip download failed" >&2; exit 1; }
  if [[ $FETCH != /* ]] && ! git check-ignore -q "$FETCH" && [ -z "$(git ls-files "$FETCH")" ]; then
    echo "/${FETCH%/}/" >> .git/info/exclude && echo "added /${FETCH%/}/ to .git/info/exclude (never commit wheels)"
  fi
  local tree wheels emoji=0
  tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
  wheels=$(du -sb "$FETCH" | cut -f1)
  [ -n "$EMOJI" ] && emoji=$(du -sb "$EMOJI" | cut -f1)
  ls -l "$FETCH"
  echo "carry budget: working tree $(mib "$tree") + $FETCH $(mib "$wheels") + ${EMOJI:-no emoji-dev} $(mib "$emoji")" \
       "= $(mib $((tree + wheels + emoji))) of $(mib $CARRY_LIMIT)"
  [ $((tree + wheels + emoji)) -le $CARRY_LIMIT ] || { echo "error: over the carry budget: carry less" >&2; exit 1; }
}
[ -n "$FETCH" ] && { fetch_wheels; exit 0; }

if $DRY; then  # tiny sizes, the CPU, in-process loading, no deadline
  [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
  DEVICE=cpu WORKERS=0 DATA_ARGS="--image_size 40 --sketches_per_class 3 --photos_per_class 3" CAPX=4
  BENCH_ARGS="--image_size 32 --batch_size 4 --batches 1 --steps 2" EMOJI_PX=32 EMOJI_MIN=0.1 TARGET=3600 HARD=3600
else           # the 8 minutes: emoji's budget shrinks to end by TARGET s; every command is cut off at HARD s
  DEVICE=cuda WORKERS=-1 DATA_ARGS="--image_size 256 --sketches_per_class 40 --photos_per_class 40" CAPX=1
  BENCH_ARGS="--image_size 224 --batch_size 64 --batches 20 --steps 50" EMOJI_PX=128 EMOJI_MIN=3 TARGET=450 HARD=462
fi
export PYTHONUNBUFFERED=1
NAMES=() RESULTS=() SECS=() FIGS=() FIG="" EMOJI_DATA=""

logged() {  # logged FILE SECONDS CMD...: CMD with its output to FILE and the log, cut off after SECONDS x CAPX
  local f=$1 t=$(($2 * CAPX)); shift 2
  [ $t -gt $((HARD - SECONDS)) ] && t=$((HARD - SECONDS)); [ $t -lt 5 ] && t=5
  timeout -k 15 "$t" "$@" 2>&1 | tee "$f"; return "${PIPESTATUS[0]}"
}
step() {  # step NAME FUNCTION ARGS...: the function sets FIG and returns 0, $SKIP, 124 (timed out) or a failure
  local name=$1 t0=$SECONDS rc r; shift; FIG=""
  echo; echo "==== $name ($(date +%T), ${SECONDS}s in) ===="
  "$@"; rc=$?
  case $rc in 0) r=pass ;; "$SKIP") r=skip ;; 124|137) r=TIMEOUT ;; *) r=FAIL ;; esac
  NAMES+=("$name") RESULTS+=("$r") SECS+=($((SECONDS - t0))) FIGS+=("$FIG")
}

setup() {
  local missing vpy site m ok="" bad="" rc=0
  missing=$("$PY" -c 'import importlib.util as u; print(*[m for m in ("gdown", "py7zr", "open_clip") if not u.find_spec(m)])')
  [ -n "$missing" ] || { FIG="gdown, py7zr, open_clip already importable"; return $SKIP; }
  [ -n "$WHEELS" ] || { FIG="not importable: $missing (no --wheels folder; no gpu-marked test needs them)"; return $SKIP; }
  "$PY" -m venv --without-pip --system-site-packages "$WORK/venv" || return 1
  vpy=$WORK/venv/bin/python
  # When python3 is itself a venv (the H200's is), --system-site-packages reaches the base python, not python3's
  # packages: a .pth file adds python3's own site folders (after the venv's, so what is installed here wins).
  site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$PY" -c 'import site; print("import site; " + "; ".join(f"site.addsitedir({p!r})" for p in site.getsitepackages()))' \
    > "$site/_python3_packages.pth" || return 1
  for m in $missing; do
    if PIP_CONFIG_FILE=/dev/null timeout 120 "$vpy" -m pip install -q --no-index --find-links "$WHEELS" \
         --no-cache-dir --disable-pip-version-check "${m/#open_clip/open_clip_torch}" && "$vpy" -c "import $m"
    then ok+=" $m"; else bad+=" $m"; rc=1; fi
  done
  PY=$vpy FIG="from $WHEELS: installed and imported${ok:- nothing}; failed${bad:- none}"
  return $rc
}

gpu_tests() {
  local rc
  logged "$WORK/tests.txt" 150 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider; rc=$?
  FIG=$(grep -E '[0-9]+ (passed|failed|skipped|deselected|errors?)' "$WORK/tests.txt" | tail -1 | sed -E 's/ in [0-9.]+s.*//; s/=//g')
  if ! $DRY && ! grep -q ' passed' <<< "$FIG"; then FIG="no test ran on the GPU: $FIG"; return 1; fi
  [ $rc -eq 5 ] && return 1 || return $rc  # 5: no test collected
}

bench_data() {
  # shellcheck disable=SC2086
  logged "$WORK/data.txt" 45 "$PY" demo_data.py --out "$WORK/bench_data" $DATA_ARGS --workers "$(nproc)" || return
  FIG=$(grep '^demo data:' "$WORK/data.txt" | sed 's/ ->.* in / in /')
}

bench() {  # bench BACKBONE
  local f=$WORK/bench_$1.txt rc
  [ -f "$WORK/bench_data/.demo_data" ] || { FIG="no bench data"; return 1; }
  # shellcheck disable=SC2086
  logged "$f" 90 "$PY" bench/bench_train.py --data_dir "$WORK/bench_data" --recipe original --backbone "$1" $BENCH_ARGS \
    --workers "$WORKERS" --device "$DEVICE"; rc=$?
  FIG=$(awk 'function imgs() { return match($0, /\([0-9]+ images/) ? substr($0, RSTART + 1, RLENGTH - 8) : "" }
    /^\(1\) loader, after +[0-9]/ { ld = int($4) }
    /^\(2\) model alone, fp32  / { fp = imgs() }
    /^\(2\) model alone, --amp \+ channels_last/ { amp = imgs() }
    /^\(3\)/ { lp = imgs() }
    /loop \/ model alone/ { sub(/.*\(defaults\): /, ""); ratio = $1 }
    END { printf "img/s: loader %s | model fp32 %s, amp+cl %s (%s) | loop %s (%sx model)", ld ? ld : "?",
          fp ? fp : "?", amp ? amp : "n/a", amp && fp ? sprintf("%.2fx", amp / fp) : "no amp on CPU",
          lp ? lp : "?", ratio ? ratio : "?" }' "$f")
  return $rc
}

sketch_lvm() {  # Sketch_LVM's method on random CLIP weights: one epoch of the bench data, then evaluated
  local size=224 batch=192
  $DRY && size=32 batch=4
  [ -f "$WORK/bench_data/.demo_data" ] || { FIG="no bench data"; return 1; }
  "$PY" -c 'import open_clip' 2>/dev/null || { FIG="open_clip is not importable (see setup)"; return $SKIP; }
  logged "$WORK/lvm_train.txt" 100 "$PY" train.py --data_dir "$WORK/bench_data" --recipe sketch_lvm_clip_vit_b32 \
    --no-pretrained --image_size "$size" --batch_size "$batch" --epochs 1 --print_every 2 \
    --checkpoint_dir "$WORK/lvm" --workers "$WORKERS" --device "$DEVICE" || return
  logged "$WORK/lvm_eval.txt" 60 "$PY" evaluate.py --model "$WORK/lvm/best.pth" --data "$WORK/bench_data" \
    --num_sketches 0 --output_dir "$WORK/lvm_eval" --workers "$WORKERS" --device "$DEVICE" || return
  FIG="$(grep -o '^done: [^;]*' "$WORK/lvm_train.txt" | sed 's/^done: //') at ${size}px, batch $batch; $("$PY" -c '
import json, sys; r = json.load(open(sys.argv[1]))
print("unseen mAP@all {:.4f} (chance {:.4f})".format(r["map_all"], r["chance_map_all"]))' "$WORK/lvm_eval/results.json")"
}

zse_sbir() {  # ZSE-SBIR's method on random weights: a few steps, then scored by its relation network
  local size=224 per=60
  $DRY && size=32 per=30
  [ -f "$WORK/bench_data/.demo_data" ] || { FIG="no bench data"; return 1; }
  logged "$WORK/zse_train.txt" 100 "$PY" train.py --data_dir "$WORK/bench_data" --recipe zse_sbir_vit_b16 \
    --image_size "$size" --quadruplets_per_epoch "$per" --epochs 1 --print_every 2 \
    --checkpoint_dir "$WORK/zse" --workers "$WORKERS" --device "$DEVICE" || return
  logged "$WORK/zse_eval.txt" 90 "$PY" evaluate.py --model "$WORK/zse/best.pth" --data "$WORK/bench_data" \
    --score relation --num_sketches 0 --output_dir "$WORK/zse_eval" --workers "$WORKERS" --device "$DEVICE" || return
  FIG="$(grep -o '^done: [^;]*' "$WORK/zse_train.txt" | sed 's/^done: //') at ${size}px; $(grep -o 'relation scores: .*' \
    "$WORK/zse_eval.txt" | head -1)"
}

emoji_train() {
  local budget rc
  EMOJI_DATA=$EMOJI
  if [ -z "$EMOJI" ]; then
    $DRY || { FIG="no emoji-dev: build it with /work/shared/bench/emoji-dev/build.sh and carry it (--emoji)"; return $SKIP; }
    EMOJI_DATA=$WORK/bench_data; echo "(dry run: no emoji-dev, training on the tiny bench data instead)"
  fi
  budget=$(awk -v left=$((TARGET - SECONDS - 75)) -v want="$EMOJI_MIN" 'BEGIN { b = left / 60; printf "%.2f", b < want ? b : want }')
  awk -v b="$budget" 'BEGIN { exit !(b < 0.5) }' && ! $DRY && { FIG="only $budget min left of the 8"; return $SKIP; }
  echo "training budget: $budget min (${SECONDS}s of the script's time spent before it)"
  logged "$WORK/emoji_train.txt" "$(awk -v b="$budget" 'BEGIN { print int(b * 60 + 75) }')" "$PY" train.py \
    --data_dir "$EMOJI_DATA" --no-pretrained --image_size "$EMOJI_PX" --budget_minutes "$budget" --print_every 200 \
    --checkpoint_dir "$WORK/emoji" --workers "$WORKERS" --device "$DEVICE"; rc=$?
  cp "$WORK/emoji/log.jsonl" "$OUTDIR/emoji_train_log.jsonl" 2>/dev/null
  FIG=$("$PY" -c 'import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if "step" in r]
last, best = rows[-1], max(r.get("val_map", 0.0) for r in rows)
print("{:,} steps, {} epochs, {:,} images at {}px (budget {} min); best seen-class val mAP@all {:.4f}".format(
      last["step"], last.get("epoch", "?"), last.get("images", 0), sys.argv[2], sys.argv[3], best))' \
    "$WORK/emoji/log.jsonl" "$EMOJI_PX" "$budget" 2>/dev/null || echo "no training log")
  return $rc
}

emoji_eval() {
  local ckpt=$WORK/emoji/best.pth
  [ -f "$ckpt" ] || ckpt=$WORK/emoji/last.pth
  [ -f "$ckpt" ] || { FIG="no checkpoint to evaluate"; [ "${RESULTS[-1]}" = skip ] && return $SKIP; return 1; }
  logged "$WORK/emoji_eval.txt" 90 "$PY" evaluate.py --model "$ckpt" --data "$EMOJI_DATA" --num_sketches 0 \
    --output_dir "$WORK/emoji_eval" --workers "$WORKERS" --device "$DEVICE" || return
  cp "$WORK/emoji_eval/results.json" "$OUTDIR/emoji_eval.json"
  FIG=$("$PY" -c 'import json, sys; r = json.load(open(sys.argv[1]))
print("unseen mAP@all {:.4f} (chance {:.4f}), {} sketches x {} photos, {}".format(
      r["map_all"], r["chance_map_all"], r["num_queries"], r["num_gallery"], sys.argv[2]))' \
    "$WORK/emoji_eval/results.json" "$(basename "$ckpt")")
}

environment() {
  echo "git commit: $(git describe --always --dirty=+dirty --abbrev=12 2>/dev/null || echo "${GIT_COMMIT:-unknown (no git here)}")"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L; else echo "nvidia-smi: not found"; fi
  "$PY" -c 'import platform, torch, torchvision
cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print("python", platform.python_version(), "torch", torch.__version__, "torchvision", torchvision.__version__,
      "CUDA device:", cuda)' 2>&1 | tail -1
}

main() {
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
  trap 'rm -rf "$WORK"' EXIT
  local banner="" env i bad=0
  $DRY && banner="########  CPU DRY RUN: tiny sizes on the CPU; it tests this script, and its figures mean NOTHING for a GPU  ########"
  [ -n "$banner" ] && printf '%s\n%s\n%s\n' "$banner" "$banner" "$banner"
  env=$(environment); echo "$env"
  echo "python: $PY; out: $OUTDIR; wheels: ${WHEELS:-none}; emoji-dev: ${EMOJI:-none}"
  step "setup" setup
  step "gpu tests" gpu_tests
  step "bench data" bench_data
  step "bench vgg16" bench vgg16
  step "bench resnet50" bench resnet50
  step "sketch_lvm" sketch_lvm
  step "zse_sbir" zse_sbir
  step "emoji train" emoji_train
  step "emoji eval" emoji_eval
  for i in "${RESULTS[@]}"; do case $i in FAIL|TIMEOUT) bad=$((bad + 1)) ;; esac; done
  {
    echo; echo "==== gpu_check summary, $(date -u '+%Y-%m-%d %H:%M UTC') ===="
    [ -n "$banner" ] && echo "$banner"
    echo "$env"
    printf '%-15s %-7s %5s  %s\n' step result sec "key figures"
    for i in "${!NAMES[@]}"; do printf '%-15s %-7s %5s  %s\n' "${NAMES[$i]}" "${RESULTS[$i]}" "${SECS[$i]}" "${FIGS[$i]}"; done
    printf '%-15s %-7s %5s  %s\n' total "$([ $bad -eq 0 ] && echo pass || echo "$bad FAIL")" "$SECONDS" \
      "bench: --recipe original, $BENCH_ARGS; full log in $OUTDIR/gpu_check.log"
    [ -n "$banner" ] && echo "$banner"
  } | tee "$OUTDIR/summary.txt"
  [ $bad -eq 0 ]
}

mkdir -p "$OUTDIR" || exit 1
main 2>&1 | tee "$OUTDIR/gpu_check.log"
exit "${PIPESTATUS[0]}"

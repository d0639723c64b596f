#!/usr/bin/env bash
# tools/gpu_check.sh: the first run of every CUDA path of bertscale on one GPU machine, one JSON summary.
#
#   bash tools/gpu_check.sh            (from the repository root, on a machine with a CUDA device)
#
# 1. installs what the machine lacks (deepspeed, webdataset, ...) from wheels carried beside the checkout
#    in $WHEELS (default .whl/, built by ../shared/gpu/make-gpu-wheels.sh): the GPU machine reaches no
#    package registry;
# 2. runs the tests marked `gpu`;
# 3. tools/bench_step.py for `large` at 128 and 512: synthetic full rows (ours vs transformers,
#    MFU) and real shards, padded vs unpadded (MFU of the samples' model FLOPs);
# 4. a 2-phase `bertscale pretrain` of `base` (ZeRO-2, LAMB; 60 + 40 steps) on shards built here
#    from the standard library's docstrings, then `bertscale convert` of its checkpoint;
# 5. the trainer's other CUDA paths, short runs of `mini`: fp16 with dynamic loss scaling and the
#    compiled encoder layers (ZeRO-2), and ZeRO-3 over both phases, then converted.
# Steps 3, 4 and 5's ZeRO-3 run train in GPU_CHECK_PRECISION (default auto: bf16 where the GPU computes it,
# else fp16; or bf16, fp16, fp32 to force one); step 5's first run is always fp16, so the fp16 path runs on
# whatever GPU is at hand. The summary names the GPU, the CPU, their bf16 capability and the precisions.
# Each step has its own time limit (on an H200 steps 1-4 took ~4 minutes; step 5, not yet run there, should
# add ~3; GPU_CHECK_ONLY splits the whole over several calls); a failing step is recorded and the rest still
# run. The last line printed is the JSON summary (also $OUT/gpu_check.json when $OUT is
# set, with every step's log in $OUT/steps.log). Exit status: 0 when every step passed.
#
# GPU_CHECK_ONLY=REGEX runs only the steps whose names match (e.g. 'build_data|pretrain_base|convert').
# GPU_CHECK_SMOKE=1 runs the same steps on CPU, small (tiny model, a few steps; the fp16 run of step 5 only
# checked with --dry-run, in GPU_CHECK_PRECISION): it checks this script's plumbing on a machine without a GPU
# (tests/test_gpu_check.py); its figures mean nothing.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-$ROOT/.whl}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOGS=$WORK/logs
mkdir -p "$LOGS"
if [ -n "${OUT:-}" ]; then trap 'rm -rf "$WORK"' EXIT; else echo "gpu_check: working in $WORK (kept)" >&2; fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)

SMOKE=${GPU_CHECK_SMOKE:-0}
PREC=${GPU_CHECK_PRECISION:-auto}
case "$PREC" in auto|bf16|fp16|fp32) ;; *) echo "gpu_check: GPU_CHECK_PRECISION must be auto, bf16, fp16 or fp32 (got $PREC)" >&2; exit 2;; esac
if [ "$SMOKE" = 1 ]; then
    BIG=tiny; BASE=tiny; ACC=cpu; DEV="--device cpu --threads 1"; ITERS=1; STEPS1=4; STEPS2=2; B128=8; B512=4
    VOCAB=2000; DOCS=400; GB1=16; MB1=8; GB2=8; MB2=4
    # DeepSpeed has no fp16 on CPU (the launcher refuses it) and compiling takes minutes there: step 5's
    # fp16 run is a --dry-run of its config in the run's own precision, eager; ZeRO-3 trains one phase
    SMALL=tiny; FP16=$PREC; COMPILE=false; VSTEPS=3; ZPHASES=1; FP16_RUN=--dry-run
else
    BIG=large; BASE=base; ACC=cuda; DEV=""; ITERS=10; STEPS1=60; STEPS2=40; B128=256; B512=128
    VOCAB=30522; DOCS=None; GB1=256; MB1=128; GB2=64; MB2=32
    SMALL=mini; FP16=fp16; COMPILE=true; VSTEPS=20; ZPHASES=2; FP16_RUN=
fi
if [ "$SMOKE" != 1 ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: torch sees no CUDA device here; run this on a GPU machine" >&2
    exit 2
fi

# --- 1. missing packages from carried wheels ---------------------------------------------------------
missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("deepspeed", "webdataset", "hjson", "braceexpand", "pydantic")
               if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "gpu_check: missing $missing and no wheels in $WHEELS (build them with ../shared/gpu/make-gpu-wheels.sh)" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$WHEELS"/*.whl \
        > "$LOGS/install.log" 2>&1 || { echo "gpu_check: wheel install failed:" >&2; cat "$LOGS/install.log" >&2; exit 2; }
    export PATH="$WORK/site/bin:$PATH"
    export PYTHONPATH="$WORK/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

declare -A STATUS
step() {  # step NAME LIMIT_S COMMAND...: run with a limit, log to $LOGS/NAME.log, record the exit status
    local name=$1 limit=$2; shift 2
    if [ -n "${GPU_CHECK_ONLY:-}" ] && ! [[ $name =~ $GPU_CHECK_ONLY ]]; then return; fi
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    STATUS[$name]="$rc $(( $(date +%s) - t0 ))"
    echo "gpu_check: $name exit $rc in $(( $(date +%s) - t0 )) s" >&2
    [ -z "${OUT:-}" ] || { echo "=== $name: exit $rc"; cat "$LOGS/$name.log"; } >> "$OUT/steps.log"
    [ $rc -eq 0 ] || tail -n 25 "$LOGS/$name.log" >&2
}

# --- 2. the gpu-marked tests ------------------------------------------------------------------------
if [ "$SMOKE" = 1 ]; then  # the gpu tests skip here; collecting them proves they import
    step gpu_tests 120 "$PY" -m pytest -m gpu tests -q -p no:cacheprovider --collect-only
else
    step gpu_tests 120 "$PY" -m pytest -m gpu tests -q -p no:cacheprovider -x
fi

# --- 3. bench_step, large -------------------------------------------------------------------------------
for s in 128 512; do
    step "bench_large_$s" 90 "$PY" tools/bench_step.py --preset $BIG --seq-len "$s" --precision $PREC \
        --iters $ITERS --warmup 1 --json $DEV
done

DATA=$WORK/data
step build_data 120 bash -c "
    set -e
    '$PY' -c 'from pathlib import Path; from bertscale.corpus import write_stdlib_corpus; \
print(write_stdlib_corpus(Path(\"$DATA/corpus/stdlib.txt\"), $DOCS).summary())'
    '$PY' -m bertscale tokenizer --input '$DATA/corpus' --vocab-size $VOCAB --out '$DATA/tokenizer'
    '$PY' -m bertscale shards --input '$DATA/corpus' --tokenizer '$DATA/tokenizer' --seq-len 128 512 \
        --out '$DATA' --samples-per-shard 2000 --no-progress"
D128=$(ls -d "$DATA"/*128* 2>/dev/null | head -1)
D512=$(ls -d "$DATA"/*512* 2>/dev/null | head -1)
step bench_data_128 90 "$PY" tools/bench_step.py --preset $BIG --precision $PREC --data "$D128" \
    --tokenizer "$DATA/tokenizer" --batch $B128 --iters $ITERS --warmup 1 --json $DEV
step bench_data_512 90 "$PY" tools/bench_step.py --preset $BIG --precision $PREC --data "$D512" \
    --tokenizer "$DATA/tokenizer" --batch $B512 --iters $ITERS --warmup 1 --json $DEV

# --- 4. two phases of base through the real launcher, then convert -------------------------------------
run_config() {  # run_config OUT_DIR PRESET DS_CONFIG PRECISION COMPILE STEPS1 STEPS2 [PHASES]: a pretrain config
    local out=$1 preset=$2 ds=$3 precision=$4 compile=$5 steps1=$6 steps2=$7 phases=${8:-2}
    cat <<EOF
[run]
name = "gpu_check"
out_dir = "$out"
seed = 1

[model]
preset = "$preset"
tokenizer = "$DATA/tokenizer"
compile = $compile

[distributed]
deepspeed_config = "$ROOT/ds_configs/$ds.json"
accelerator = "$ACC"
num_gpus = 1

[optimizer]
name = "lamb"

[train]
precision = "$precision"
log_interval = 10
save_interval = 1000
eval_batches = 4

[[phases]]
name = "phase1"
seq_len = 128
data = "$D128"
global_batch = $GB1
micro_batch = $MB1
steps = $steps1
lr = 2e-3
warmup = 0.2
EOF
    [ "$phases" = 1 ] || cat <<EOF

[[phases]]
name = "phase2"
seq_len = 512
data = "$D512"
global_batch = $GB2
micro_batch = $MB2
steps = $steps2
lr = 1e-3
warmup = 0.2
EOF
}
RUN=$WORK/run
run_config "$RUN" "$BASE" zero2 "$PREC" false "$STEPS1" "$STEPS2" > "$WORK/base.toml"
step pretrain_base 200 "$PY" -m bertscale pretrain --config "$WORK/base.toml"
step convert 60 "$PY" -m bertscale convert --checkpoint "$RUN/checkpoints" --out "$WORK/hf"

# --- 5. fp16 with the compiled layers; ZeRO-3 -----------------------------------------------------------
run_config "$WORK/run_fp16" "$SMALL" zero2 "$FP16" "$COMPILE" "$VSTEPS" 0 1 > "$WORK/fp16.toml"
step pretrain_fp16_compile 180 "$PY" -m bertscale pretrain --config "$WORK/fp16.toml" $FP16_RUN
run_config "$WORK/run_zero3" "$SMALL" zero3 "$PREC" false "$VSTEPS" "$(( (VSTEPS + 1) / 2 ))" $ZPHASES > "$WORK/zero3.toml"
step pretrain_zero3 150 "$PY" -m bertscale pretrain --config "$WORK/zero3.toml"
step convert_zero3 60 "$PY" -m bertscale convert --checkpoint "$WORK/run_zero3/checkpoints" --out "$WORK/hf_zero3"

# --- summary ----------------------------------------------------------------------------------------
STATUS_LINES=$(for k in "${!STATUS[@]}"; do echo "$k ${STATUS[$k]}"; done)
"$PY" - "$LOGS" "$(( $(date +%s) - START ))" "$PREC" "$ACC" <<EOF
import json, re, sys, torch
from pathlib import Path
from bertscale import hardware
logs, seconds, requested, accelerator = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
steps = {}
for line in """$STATUS_LINES""".strip().splitlines():
    name, rc, secs = line.split()
    steps[name] = {"exit": int(rc), "seconds": int(secs)}

def last_json(name):
    try:
        lines = (logs / f"{name}.log").read_text(errors="replace").strip().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None

out = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (smoke)", "torch": torch.__version__, "cuda": torch.version.cuda,
       **hardware.machine_report(),
       "gpu_bf16": hardware.cuda_bf16(1)[1] if torch.cuda.is_available() else None,
       "precision": {"requested": requested, "used": hardware.choose(requested, accelerator).name,
                     "fp16_run": "fp16" if accelerator == "cuda" else hardware.choose(requested, accelerator).name},
       "seconds": seconds, "steps": steps, "passed": all(v["exit"] == 0 for v in steps.values())}
t = (logs / "gpu_tests.log")
if t.exists():
    m = re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", t.read_text(errors="replace"))
    out["gpu_tests"] = {k: int(n) for n, k in m}
for s in (128, 512):
    r = last_json(f"bench_large_{s}")
    if r:
        out[f"large_{s}_synthetic"] = {k: r.get(k) for k in ("batch", "ours_tflops", "ours_mfu", "peer_tflops",
                                                            "matmul_tflops", "ours_peak_mem_gib") if k in r}
    r = last_json(f"bench_data_{s}")
    if r:
        x = next(iter(r["lengths"].values()))
        out[f"large_{s}_real_shards"] = {
            "batch": x["batch"], "speedup_unpadded": x["speedup"],
            **{f"{n}_{k}": x[n].get(k) for n in ("padded", "unpadded")
               for k in ("fill", "real_tokens_per_s", "mfu")},
            "attention_kernel": x["unpadded"].get("attention_kernel")}
for name, key in (("pretrain_base", "pretrain_last_lines"), ("pretrain_fp16_compile", "fp16_compile_last_lines"),
                  ("pretrain_zero3", "zero3_last_lines")):
    p = logs / f"{name}.log"
    if p.exists():
        text = p.read_text(errors="replace")
        out[key] = [l[:240] for l in text.strip().splitlines() if re.search(r"step|finished|scale|error|Error", l)][-6:]
        chosen = re.search(r"precision (bf16|fp16|fp32) \(train.precision", text)
        out[key.replace("_last_lines", "_precision")] = chosen.group(1) if chosen else None
print(json.dumps(out))
if "${OUT:-}":
    Path("${OUT:-}", "gpu_check.json").write_text(json.dumps(out, indent=1))
EOF
rc=0
for k in "${!STATUS[@]}"; do set -- ${STATUS[$k]}; [ "$1" -eq 0 ] || rc=1; done
exit $rc

#!/usr/bin/env bash
# The GPU check of issue 13: on a machine with one CUDA GPU and no network, within 8 minutes,
#   (a) the CUDA test subset: `TRITON_INTERPRET=0 pytest -m cuda tests/test_cuda.py` (the Triton backend against
#       the torch backend and float64 at real shapes, float32 and bf16);
#   (b) `prefuse bench` of the head, the per-token log-probs and the preference loss at Llama-3-8B-like shapes
#       (H=4096, V=128256, N=4096, 16384 and 32768 tokens, bf16) against Liger-Kernel, cut-cross-entropy (its Triton
#       kernel) and PyTorch's op, each task's JSON, markdown table and PNG (against N) in OUT_DIR, and OUT_DIR/summary.md.
#
# Usage:
#   bench/download_wheels.sh                  # beforehand, where there is network: the peers' wheels -> bench/wheels/
#   (copy the repository with bench/wheels/ to the GPU machine; torch with CUDA, triton and prefuse's dependencies
#    must be installed there already)
#   bench/gpu_check.sh OUT_DIR                # on the GPU machine: installs the missing peers from bench/wheels with
#                                             # `pip install --no-index --find-links`, then (a) and (b)
#   bench/gpu_check.sh --dry-run OUT_DIR      # anywhere, no GPU needed: checks the wheels folder, prints every command
#                                             # of the GPU run, runs the CUDA subset (it skips) and the three benches
#                                             # with --quick on the CPU into OUT_DIR
# Environment:
#   PYTHON              the interpreter (default: the repository's .venv/bin/python when present, else python3)
#   GPU_CHECK_WHEELS    the wheels folder (default: bench/wheels, ignored by git)
#   GPU_CHECK_DRY_RUN=1 the same as --dry-run
#   GPU_CHECK_STAGES    the stages to run, of "install tests bench" (default: all three)
#   GPU_CHECK_BUDGET_S  the whole run's time limit in seconds (default 470); each stage gets its share or what is left
# A peer that is neither installed nor in the wheels folder is left out of the benches (they say which).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
OUT=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,26p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "gpu_check.sh: error: unknown option $arg (see --help)" >&2; exit 2 ;;
        *) if [ -n "$OUT" ]; then echo "gpu_check.sh: error: one output folder, got $OUT and $arg" >&2; exit 2; fi
           OUT="$arg" ;;
    esac
done
if [ -z "$OUT" ]; then echo "gpu_check.sh: error: give the output folder: bench/gpu_check.sh [--dry-run] OUT_DIR" >&2; exit 2; fi
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
WHEELS="${GPU_CHECK_WHEELS:-$REPO/bench/wheels}"
STAGES="${GPU_CHECK_STAGES:-install tests bench}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
cd "$REPO" || exit 2

# the peers: "pip name:module" (the wheels' file names use the module's spelling)
PEERS="liger-kernel:liger_kernel cut-cross-entropy:cut_cross_entropy matplotlib:matplotlib"
# the paths of each task (those not installed are left out); shapes: head and logprobs NxHxV, preference BxTxHxV
HEAD_PATHS="prefuse_triton prefuse_torch cce_triton liger_fused_linear_cross_entropy torch_linear_cross_entropy materialized"
LOGPROBS_PATHS="prefuse_logprobs_triton prefuse_logprobs cce_triton_logprobs liger_logprobs torch_linear_logprobs materialized_logprobs"
PREFERENCE_PATHS="prefuse_preference liger_dpo materialized_preference"
TOKEN_SHAPES="4096x4096x128256 16384x4096x128256 32768x4096x128256"
PAIR_SHAPES="1x2048x4096x128256 4x2048x4096x128256 8x2048x4096x128256"   # 2*B*T = 4096, 16384, 32768 tokens
ROUNDS=3
# seconds per stage (all of them within the 8 minutes, with room for the CLI's start-ups)
declare -A STAGE_S=([install]=30 [tests]=150 [head]=100 [logprobs]=100 [preference]=70)

STARTED=$SECONDS
SUMMARY="$OUT/summary.md"
note() { echo "$*"; echo "$*" >> "$OUT/notes.txt"; }
: > "$OUT/notes.txt"
left() { echo $(( BUDGET_S - (SECONDS - STARTED) )); }
# run NAME SECONDS CMD...: prints the command, runs it under a timeout (the smaller of its share and what is left)
run() {
    local name="$1" share="$2"; shift 2
    local limit; limit=$(left); [ "$share" -lt "$limit" ] && limit=$share
    echo "+ $*"
    if [ "$limit" -le 5 ]; then note "$name: skipped, the time budget is spent"; return 124; fi
    local t0=$SECONDS rc
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    [ $rc -eq 124 ] && note "$name: timed out after ${limit}s"
    note "$name: exit $rc after $(( SECONDS - t0 ))s"
    return $rc
}

if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    note "dry run: no GPU used; the benches run with --quick on the CPU"
else
    DEVICE=cuda
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_check.sh: error: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False); use --dry-run here" >&2
        exit 2
    fi
fi

# -- install: the peers missing here, from the wheels folder (never from an index) ----------------------------------
install_peers() {
    local want=() have_wheel=() modules=() entry pip_name module importable
    for entry in $PEERS; do modules+=("${entry##*:}"); done
    importable=" $("$PYTHON" -c "import importlib.util, sys
print(*[m for m in sys.argv[1:] if importlib.util.find_spec(m)])" "${modules[@]}") "
    for entry in $PEERS; do
        pip_name="${entry%%:*}"; module="${entry##*:}"
        if [[ "$importable" == *" $module "* ]]; then
            note "peer $pip_name: installed"
            [ "$DRY_RUN" = 1 ] || continue   # the dry run checks the wheels of every peer
        fi
        want+=("$pip_name")
        if compgen -G "$WHEELS/${module}-*.whl" > /dev/null; then
            have_wheel+=("$pip_name")
        else
            note "peer $pip_name: no wheel in $WHEELS"
        fi
    done
    [ ${#want[@]} -eq 0 ] && return 0
    if [ ${#have_wheel[@]} -eq 0 ]; then
        note "no peer wheels in $WHEELS: run bench/download_wheels.sh where there is network and copy bench/wheels/ here"
        return 0
    fi
    local cmd=("$PYTHON" -m pip install --no-index --find-links "$WHEELS" "${have_wheel[@]}")
    if [ "$DRY_RUN" = 1 ]; then
        echo "would run: ${cmd[*]}"
        note "wheels found for: ${have_wheel[*]}"
    else
        run install "${STAGE_S[install]}" "${cmd[@]}" || note "install failed: the benches leave out what is missing"
    fi
}

# -- (a) the CUDA test subset ------------------------------------------------------------------------------------------
cuda_tests() {
    local cmd=(env TRITON_INTERPRET=0 "$PYTHON" -m pytest -m cuda tests/test_cuda.py -q -rs -p no:cacheprovider
               --junitxml "$OUT/cuda_tests.xml")
    run tests "${STAGE_S[tests]}" "${cmd[@]}" 2>&1 | tee "$OUT/cuda_tests.log"
    note "cuda tests: $(grep -E '[0-9]+ (passed|failed|skipped|errors?)' "$OUT/cuda_tests.log" | tail -n 1)"
}

# -- (b) prefuse bench at Llama-3-8B-like shapes ---------------------------------------------------------------------
installed_paths() {  # -> lines "TASK PATH...": the paths of each task this machine can run (the dry run: prefuse's
                     # and the materializing one, enough to exercise the commands on the CPU in seconds)
    "$PYTHON" -c "import sys; from prefuse.bench.report import available_paths
for task, wanted in zip(('head', 'logprobs', 'preference'), sys.argv[3:]):
    have = set(available_paths(sys.argv[1], task))
    keep = [p for p in wanted.split() if p in have and (sys.argv[2] != '1' or p.startswith(('prefuse', 'materialized')))]
    print(task, *keep)" "$DEVICE" "$DRY_RUN" "$HEAD_PATHS" "$LOGPROBS_PATHS" "$PREFERENCE_PATHS"
}

bench_task() {  # TASK "WANTED PATHS" "SHAPES" "PATHS TO RUN": the output goes to OUT/TASK.log
    local task="$1" wanted="$2" shapes="$3" paths="$4" p
    for p in $wanted; do
        case " $paths " in *" $p "*) ;; *) note "$task: $p not run on $DEVICE$( [ "$DRY_RUN" = 1 ] && echo ' (dry run)')" ;; esac
    done
    local cmd=("$PYTHON" -m prefuse bench --task "$task" --device "$DEVICE")
    if [ "$DRY_RUN" = 1 ]; then
        echo "would run: $PYTHON -m prefuse bench --task $task --device cuda --dtype bfloat16 --shapes $shapes" \
             "--rounds $ROUNDS --paths <those of: $wanted installed> --json $OUT/$task.json --markdown $OUT/$task.md" \
             "--plot $OUT/$task"
        cmd+=(--quick)
    else
        cmd+=(--dtype bfloat16 --shapes $shapes --rounds $ROUNDS)
    fi
    [ -n "$paths" ] || { note "$task: no path available"; return 1; }
    cmd+=(--paths $paths --json "$OUT/$task.json" --markdown "$OUT/$task.md" --plot "$OUT/$task")
    run "$task" "${STAGE_S[$task]}" "${cmd[@]}" > "$OUT/$task.log" 2>&1
}

benches() {
    local -A wanted=([head]="$HEAD_PATHS" [logprobs]="$LOGPROBS_PATHS" [preference]="$PREFERENCE_PATHS")
    local -A shapes=([head]="$TOKEN_SHAPES" [logprobs]="$TOKEN_SHAPES" [preference]="$PAIR_SHAPES")
    local -A paths=() pids=()
    local task rest failed=0
    while read -r task rest; do paths[$task]="$rest"; done < <(installed_paths)
    for task in head logprobs preference; do
        if [ "$DRY_RUN" = 1 ]; then  # timings mean nothing in the dry run: the three run side by side
            bench_task "$task" "${wanted[$task]}" "${shapes[$task]}" "${paths[$task]:-}" &
            pids[$task]=$!
        else  # on the GPU one at a time, so that no bench shares the device
            bench_task "$task" "${wanted[$task]}" "${shapes[$task]}" "${paths[$task]:-}" || failed=1
            tail -n 30 "$OUT/$task.log"
        fi
    done
    if [ "$DRY_RUN" = 1 ]; then
        for task in head logprobs preference; do
            wait "${pids[$task]}" || failed=1
            tail -n 30 "$OUT/$task.log"
        done
    fi
    return $failed
}

environment() {
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "repository: $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git'))"
        command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        "$PYTHON" - "$DRY_RUN" <<'EOF'
import importlib.metadata as md
import platform
import sys
print(f"python {platform.python_version()}")
if sys.argv[1] != "1":  # importing torch costs seconds: not in the dry run
    import torch
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device {torch.cuda.get_device_name()}")
for name in ("torch", "triton", "liger-kernel", "cut-cross-entropy", "transformers", "matplotlib"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
EOF
    } > "$OUT/environment.txt" 2>&1
}

case " $STAGES " in *" install "*) install_peers ;; esac
environment
case " $STAGES " in *" tests "*) cuda_tests ;; esac
failed=0
case " $STAGES " in *" bench "*) benches || failed=1 ;; esac

{
    echo "# GPU check$( [ "$DRY_RUN" = 1 ] && echo ' (dry run on the CPU, --quick)')"
    echo
    echo '```'
    cat "$OUT/environment.txt"
    echo '```'
    echo
    echo "Notes:"
    echo
    sed 's/^/- /' "$OUT/notes.txt"
    for task in head logprobs preference; do
        [ -f "$OUT/$task.md" ] || continue
        echo
        echo "## $task"
        echo
        cat "$OUT/$task.md"
        [ -f "$OUT/${task}_vs_tokens.png" ] && echo && echo "![${task}](${task}_vs_tokens.png)"
    done
} > "$SUMMARY"
echo "gpu_check: $(( SECONDS - STARTED ))s; results in $OUT (summary.md)"
exit $failed

#!/usr/bin/env bash
# One 4-GPU session (NVLink host) for issue 8 (gradient compression) and issue 10 (scaling), under 560 s in all.
#
#   bash benchmarks/multi_gpu_session.sh OUT_DIR        # from the repo root; python3/torchrun on PATH
#
# Parts, in order (most important and cheapest first), each under its own `timeout`, capped so the whole script
# ends by BUDGET_S (default 550 s) after its start; each writes OUT_DIR/<part>.log and OUT_DIR/<part>.json (the
# JSON is rewritten after every method/optimizer, so a part cut short keeps what it finished) and prints one
# "SUMMARY" line (also appended to OUT_DIR/summary.txt):
#   a_nvlink_2gpu   GPUs 0,1, NVLink: ddp_compression ddp, auto, plain DDP again (200 steps: run-to-run spread
#                   around auto), bf16, torch_bf16, 300 steps each. Plain DDP's eval loss after 300 steps here is
#                   also part b's reference: with two ranks the fp32 all-reduce sums the same two numbers whatever
#                   the transport, so socket DDP trains the same model
#   b_socket_2gpu   GPUs 0,1, NCCL socket transport: plain DDP and torch PowerSGD 40 steps (step time and bytes);
#                   ours powersgd (rank 4), powersgd rank 16 and auto 300 steps (time, bytes, eval loss)
#   c_socket_4gpu   GPUs 0-3, socket transport: plain DDP 25 steps, powersgd and powersgd rank 16 40 steps
#   d_scaling_w1/w2/w4   ddp_scaling (AdamW fused, Shampoo f10, SOAP f10, K-FAC f10) at 1, 2, 4 ranks, NVLink
#   e_auto_nvlink    GPUs 0,1, NVLink: plain DDP and auto, 300 steps each, then both again for 200 (auto within
#                    1.02x of DDP; the 300-step DDP eval loss is also the reference of part f)
#   f_socket_sync    GPUs 0,1, socket: plain DDP 40 steps; local SGD H=8; local SGD H=4 with bf16 deltas (the
#                    same bytes per step as H=8); PowerSGD rank 4 (after the CUDA stream fix), 300 steps each
#   g_memory_2gpu    GPUs 0,1: heterogeneous_memory.py ours, 3.14B sharded over both GPUs, 12 GiB of each used
#   g_memory_4gpu    GPUs 0-3: the same sharded over four GPUs, then 10.82B (auto, whole cards) over four
#   h_socket_4gpu    GPUs 0-3, socket: plain DDP 25 steps, local SGD H=4 with bf16 deltas and auto 100 steps
# PARTS (default "a b c d_scaling_w1 d_scaling_w2 d_scaling_w4") picks and orders the parts, e.g.
#   PARTS="e_auto_nvlink f_socket_sync d_scaling_w1 d_scaling_w4 g_memory_2gpu" bash benchmarks/multi_gpu_session.sh OUT
# Estimates (H100; plain DDP 59 ms NVLink / ~350 ms socket per step): a ~120 s, b ~130 s, c ~60 s, d ~120 s,
# e ~40 s, f ~200 s, g ~80 s.
set -u
OUT=${1:?usage: bash benchmarks/multi_gpu_session.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 1
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
BUDGET_S=${BUDGET_S:-550}
START=$(date +%s)
SOCKET=(NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 NCCL_NET=Socket NCCL_SOCKET_IFNAME=lo)
RUN2=(torchrun --standalone --nproc_per_node 2)
RUN4=(torchrun --standalone --nproc_per_node 4)

{ date -u; git rev-parse --short HEAD; git status --short; nvidia-smi -L; nvidia-smi topo -m; env | grep "^NCCL_" | sort; } \
    > "$OUT/env.txt" 2>&1

summarize() {  # summarize JSON LOG: one line from a results file (ddp_compression or ddp_scaling rows)
    python3 - "$1" "$2" <<'EOF'
import json, os, sys
path, log = sys.argv[1:3]
rows = json.load(open(path)) if os.path.exists(path) else []
parts = []
for r in rows:
    if "spec" in r:  # ddp_compression
        mb = sum(r["bytes_per_step"].values()) / 2**20
        parts.append(f"{r['spec']} {r['step_ms_median']}ms eval {r['eval_loss']} {mb:.1f}MiB/step")
    else:  # ddp_scaling
        parts.append(f"{r['name']} step {r['step_ms_mean']}ms opt {r['opt_ms_mean']}ms (max rank "
                     f"{r['opt_ms_mean_max_rank']}) {r['peak_GiB']}GiB")
if not parts and os.path.exists(log):  # heterogeneous_memory.py prints its result line instead
    parts = [line.strip()[:700] for line in open(log, errors="replace") if line.startswith("RESULT ")]
if not parts:
    tail = open(log, errors="replace").read().strip().splitlines()[-1:] if os.path.exists(log) else ["no log"]
    parts = ["no results; log ends: " + (tail[0][:200] if tail else "")]
print("; ".join(parts))
EOF
}

part() {  # part NAME CAP_S CMD...: CMD under timeout min(CAP_S, time left), output in $OUT/NAME.{log,json}
    local name=$1 cap=$2; shift 2
    local left=$(( START + BUDGET_S - $(date +%s) - 7 ))  # 7 s: timeout's kill grace and the summary
    local limit=$(( cap < left ? cap : left )) t0=$SECONDS rc status
    if (( limit < 20 )); then
        echo "SUMMARY $name: skipped (${left}s left)" | tee -a "$OUT/summary.txt"
        return 0
    fi
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in 0) status=ok ;; 124|137) status="TIMEOUT at ${limit}s" ;; *) status="rc=$rc" ;; esac
    echo "SUMMARY $name ($(( SECONDS - t0 ))s, $status): $(summarize "$OUT/$name.json" "$OUT/$name.log")" \
        | tee -a "$OUT/summary.txt"
}

run_part() {
    case $1 in
    a) part a_nvlink_2gpu 160 env CUDA_VISIBLE_DEVICES=0,1 "${RUN2[@]}" benchmarks/ddp_compression.py \
        --methods ddp,auto,ddp@200,bf16,torch_bf16 --steps 300 --out "$OUT/a_nvlink_2gpu.json" ;;
    b) part b_socket_2gpu 170 env CUDA_VISIBLE_DEVICES=0,1 "${SOCKET[@]}" "${RUN2[@]}" benchmarks/ddp_compression.py \
        --methods ddp@40,powersgd,powersgd:rank=16,torch_powersgd@40,auto --steps 300 --out "$OUT/b_socket_2gpu.json" ;;
    c) part c_socket_4gpu 100 env CUDA_VISIBLE_DEVICES=0,1,2,3 "${SOCKET[@]}" "${RUN4[@]}" benchmarks/ddp_compression.py \
        --methods ddp@25,powersgd,powersgd:rank=16 --steps 40 --out "$OUT/c_socket_4gpu.json" ;;
    d_scaling_w1) part d_scaling_w1 90 env CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc_per_node 1 \
        benchmarks/ddp_scaling.py --steps 30 --out "$OUT/d_scaling_w1.json" ;;
    d_scaling_w2) part d_scaling_w2 80 env CUDA_VISIBLE_DEVICES=0,1 "${RUN2[@]}" benchmarks/ddp_scaling.py \
        --steps 30 --out "$OUT/d_scaling_w2.json" ;;
    d_scaling_w4) part d_scaling_w4 80 env CUDA_VISIBLE_DEVICES=0,1,2,3 "${RUN4[@]}" benchmarks/ddp_scaling.py \
        --steps 30 --out "$OUT/d_scaling_w4.json" ;;
    e_auto_nvlink) part e_auto_nvlink 170 env CUDA_VISIBLE_DEVICES=0,1 "${RUN2[@]}" benchmarks/ddp_compression.py \
        --methods ddp,auto,ddp@200,auto@200 --steps 300 --out "$OUT/e_auto_nvlink.json" ;;
    f_socket_sync) part f_socket_sync 230 env CUDA_VISIBLE_DEVICES=0,1 "${SOCKET[@]}" "${RUN2[@]}" \
        benchmarks/ddp_compression.py --methods ddp@40,local_sgd,local_sgd:sync_every=4+sync_dtype=bfloat16,powersgd \
        --steps 300 --out "$OUT/f_socket_sync.json" ;;
    g_memory_2gpu) part g_memory_2gpu 120 env CUDA_VISIBLE_DEVICES=0,1 "${RUN2[@]}" benchmarks/heterogeneous_memory.py \
        ours --hidden 3072 --layers 26 --options placement=auto,device_memory_gib=12 ;;
    g_memory_4gpu) part g_memory_4gpu 120 env CUDA_VISIBLE_DEVICES=0,1,2,3 "${RUN4[@]}" \
            benchmarks/heterogeneous_memory.py ours --hidden 3072 --layers 26 --options placement=auto,device_memory_gib=12
        part g_memory_4gpu_largest 300 env CUDA_VISIBLE_DEVICES=0,1,2,3 "${RUN4[@]}" \
            benchmarks/heterogeneous_memory.py ours --hidden 4096 --layers 53 --steps 7 --options placement=auto ;;
    h_socket_4gpu) part h_socket_4gpu 150 env CUDA_VISIBLE_DEVICES=0,1,2,3 "${SOCKET[@]}" "${RUN4[@]}" \
        benchmarks/ddp_compression.py --methods ddp@25,local_sgd:sync_every=4+sync_dtype=bfloat16,auto \
        --steps 100 --out "$OUT/h_socket_4gpu.json" ;;
    *) echo "unknown part $1" >&2 ;;
    esac
}

for name in ${PARTS:-a b c d_scaling_w1 d_scaling_w2 d_scaling_w4}; do
    run_part "$name"
done

# Issue 8's two checks from parts a and b (reference: plain DDP of the same transport for time, a's for eval loss)
python3 - "$OUT" <<'EOF' | tee -a "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
def rows(name):
    path = os.path.join(out, name + ".json")
    return {r["spec"]: r for r in json.load(open(path))} if os.path.exists(path) else {}
a, b = rows("a_nvlink_2gpu") or rows("e_auto_nvlink"), rows("b_socket_2gpu") or rows("f_socket_sync")
for auto_spec in [k for k in a if k.startswith("auto")]:
    for spec in [k for k in a if k.startswith("ddp")]:
        r, d = a[auto_spec], a[spec]
        print(f"ISSUE8 nvlink: {auto_spec} {r['step_ms_median']} / {spec} {d['step_ms_median']} ms median = "
              f"{r['step_ms_median'] / d['step_ms_median']:.3f}x, mean {r['step_ms_mean'] / d['step_ms_mean']:.3f}x "
              f"(target <= 1.02), auto chose {r.get('auto', {}).get('chosen')}")
base = b.get("ddp@40") or b.get("ddp")
ref = a.get("ddp")
for spec, r in b.items():
    if r["method"] in ("ddp", "torch_bf16", "torch_powersgd") or not base:
        continue
    loss = f"eval {r['eval_loss']}"
    if ref and r["steps"] == ref["steps"]:
        loss += f" vs DDP {ref['eval_loss']} ({100 * (r['eval_loss'] / ref['eval_loss'] - 1):+.2f}%, target <= +1%)"
    print(f"ISSUE8 socket: {spec} {r['step_ms_median']} / ddp {base['step_ms_median']} ms = "
          f"{r['step_ms_median'] / base['step_ms_median']:.3f}x (target <= 0.35), {loss}")
EOF
echo "total $(( $(date +%s) - START ))s"

#!/bin/bash
# Every GPU row of the project's performance targets, in parts that each fit a 10-minute call.
#
#   bash benchmarks/gpu_checks.sh OUT_DIR [PART ...]      PART: tests step update ops (default: all four)
#
# Each command runs under its own timeout and prints its wall time; reports and logs go to OUT_DIR, ready to
# be copied into benchmarks/results/ with the card's name. The per-layer reference engine of the update rows
# is revision 2f232e3 (REFERENCE=path/to/engine.py where the checkout has no git history).
# Extra packages (e.g. a newer transformers) can be put on PYTHONPATH before calling this script.
set -u
out=${1:?usage: bash benchmarks/gpu_checks.sh OUT_DIR [tests|step|update|ops ...]}
shift
parts=${*:-tests step update ops}
for part in $parts; do
    case $part in
    tests | step | update | ops) ;;
    *)
        echo "unknown part '$part': use tests, step, update or ops" >&2
        exit 2
        ;;
    esac
done
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
reference=${REFERENCE:-2f232e3}
py=${PYTHON:-python3}

run() {  # run LABEL TIMEOUT_S COMMAND...
    local label=$1 limit=$2 start
    shift 2
    start=$(date +%s)
    timeout "$limit" "$@" >"$out/$label.log" 2>&1
    local rc=$?
    echo "== $label: exit $rc, $(($(date +%s) - start)) s"
    tail -n 4 "$out/$label.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$out/card.txt" 2>&1
$py -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" >>"$out/card.txt" 2>&1
cat "$out/card.txt"

for part in $parts; do
    case $part in
    tests)
        run pytest_gpu 240 $py -m pytest -m gpu -q -p no:cacheprovider tests
        ;;
    step)
        run overhead_130m 200 $py benchmarks/bench_overhead.py --devices cuda --out "$out/overhead_cuda.md"
        run overhead_1b 280 $py benchmarks/bench_overhead.py --devices cuda --model 1B --rounds 4 \
            --out "$out/overhead_1b_cuda.md"
        ;;
    update)
        run update_130m_1b 150 $py benchmarks/bench_topology.py --full-model 130M 1B --devices cuda --repeats 3 \
            --reference "$reference" --out "$out/topology_update_cuda.md"
        run update_7b 330 $py benchmarks/bench_topology.py --full-model 7B --devices cuda --repeats 2 \
            --reference "$reference" --out "$out/topology_update_7b_cuda.md"
        ;;
    ops)
        run ops 240 $py benchmarks/bench_topology.py --shapes 4096x4096 11008x4096 --densities 0.3 0.05 \
            --devices cuda --repeats 3 --out "$out/topology_cuda.md"
        run ch_precision 150 $py benchmarks/bench_topology.py --ch-precision-table --shapes 11008x4096 4096x4096 \
            --densities 0.3 0.05 --devices cuda --repeats 3 --out "$out/ch_precision_cuda.md"
        run init_7b 90 $py benchmarks/bench_init.py --devices cpu cuda --out "$out/init_7b_cuda.md"
        ;;
    esac
done


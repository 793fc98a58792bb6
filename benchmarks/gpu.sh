#!/usr/bin/env bash
# Every GPU figure in one command: the CUDA-only tests, then each benchmark on CUDA at the GPU sizes,
# writing benchmarks/results/<name>-gpu.json. Run from the repository root of a plain checkout:
#
#     bash benchmarks/gpu.sh              # on a CUDA machine (python3 with torch, lightning, tensorboard)
#     bash benchmarks/gpu.sh --dry-run    # anywhere: print the commands; each script must import and
#                                         # parse its arguments (--help), the tests must collect
#
# No pip install: the tree runs with PYTHONPATH=. (hessdiag from the checkout). The CUDA-only tests
# are the ones skipped without CUDA (`skipif(not torch.cuda.is_available())`); the files that hold them
# are run whole, with -rs so that a skip still shows. pytest and the peers (pyhessian,
# hessian-eigenthings, curvlinops) are optional: without them that step is reported skipped.
# PYTHON=... picks the interpreter (default python3). A failing step does not stop the others; the
# exit status is non-zero if any failed.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
mkdir -p benchmarks/results
failed=()

step() {  # step NAME COMMAND...: run one step (dry run: check that it parses its arguments), remember a failure
    local name="$1"; shift
    echo "== $name: $*"
    if [ "$DRY_RUN" = 1 ]; then
        if [ "$name" = tests ]; then "$@" --collect-only -q > /dev/null; else "$@" --help > /dev/null; fi \
            || failed+=("$name")
        return
    fi
    "$@" || failed+=("$name")
}

if [ "$DRY_RUN" = 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "CUDA is not available to $PYTHON: nothing measured (use --dry-run to check the plumbing)." >&2
    exit 2
fi
"$PYTHON" -c "import torch, hessdiag; print('torch', torch.__version__, '| hessdiag from', hessdiag.__file__)" || exit 2

cuda_test_files=$(grep -l "skipif(not torch.cuda.is_available()" tests/*.py | tr '\n' ' ')
if "$PYTHON" -c "import pytest" 2>/dev/null; then
    step tests "$PYTHON" -m pytest -q -rs $cuda_test_files
else
    echo "== tests: skipped (pytest is not installed for $PYTHON); files: $cuda_test_files"
fi

step engine "$PYTHON" benchmarks/engine.py --size gpu --out benchmarks/results/engine-gpu.json
step products "$PYTHON" benchmarks/products.py --size gpu --out benchmarks/results/products-gpu.json
step overhead "$PYTHON" benchmarks/overhead.py --size gpu --out benchmarks/results/overhead-gpu.json
step cost "$PYTHON" benchmarks/cost.py --quick --out benchmarks/results/cost-gpu.json
step cadence "$PYTHON" benchmarks/cadence.py --steps 3000 3000 --pairs 3 --out benchmarks/results/cadence-gpu.json
step tracking "$PYTHON" benchmarks/tracking.py --steps 3000 3000 --out benchmarks/results/tracking-gpu.json
if "$PYTHON" -c "import pyhessian" 2>/dev/null; then
    step bookkeeping "$PYTHON" benchmarks/bookkeeping.py --out benchmarks/results/bookkeeping-gpu.json
else
    echo "== bookkeeping: skipped (pyhessian is not importable by $PYTHON)"
fi
if "$PYTHON" -c "import pyhessian, hessian_eigenthings, curvlinops" 2>/dev/null; then
    step peers "$PYTHON" benchmarks/peers.py --out benchmarks/results/peers-gpu.json
else
    echo "== peers: skipped (pyhessian, hessian-eigenthings and curvlinops are not importable by $PYTHON;" \
         "put them on PYTHONPATH, e.g. pip install --target DIR on a machine with network access)"
fi

if [ "$DRY_RUN" = 0 ]; then
    "$PYTHON" - <<'EOF'
import json, pathlib
for path in sorted(pathlib.Path("benchmarks/results").glob("*-gpu.json")):
    report = json.loads(path.read_text())
    print(f"{path}: {report.get('device')} torch {report.get('torch')} {report.get('date')}")
EOF
fi
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed steps: ${failed[*]}" >&2
    exit 1
fi

#!/usr/bin/env bash
# Issue 4 on the two-GPU machine (nvidia-h200-x2): build the extension in place, then the sharded
# DLRM comparison over NCCL (bench/bench_sharded.py: correctness checks of the sharded TT module,
# uncompressed EBC + TorchRec plan vs 7 TT tables + torchrec_tt.sharding.plan).
# Run from the repository root once the staged TorchRec stack is installed and its environment
# sourced (`. /root/gw/env.sh`). torchrec.datasets needs iopath, which the staged stack lacks:
# carry its wheels (`pip download --no-deps --only-binary=:all: --python-version 3.12
# iopath==0.1.9 portalocker -d .whl`) and install them into /tmp/site first.
#   bash bench/gpu_sharded_session.sh [bench_sharded.py args]
# Without args the benchmark runs --configs uncompressed,tt,tt_dp (tt_dp: TT tables constrained
# to data_parallel, the replication issue 4 is about; plan() may choose table_wise for them).
# Writes $OUT/build.log and $OUT/sharded.txt. SKIP_BUILD=1 reuses an in-place build of this
# Python that is already there (the machine keeps ignored build outputs while it is held);
# BUILD_TIMEOUT and BENCH_TIMEOUT (default 240 s each) bound the two steps; a typical session
# (build + about 2 minutes of benchmark) stays well under 8 minutes.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# NVLink SHARP / multicast stay off on these machines (env.sh sets them; forced here too).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
t_start=$(date +%s)

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -4
date -u +"date %Y-%m-%dT%H:%M:%SZ"
python3 -c "import torch, fbgemm_gpu, torchrec; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| fbgemm_gpu', getattr(fbgemm_gpu, '__version__', '?'), '| torchrec', getattr(torchrec, '__version__', '?'), '| GPUs', torch.cuda.device_count())" \
  || { echo "the TorchRec stack does not import: install the staged wheels and source /root/gw/env.sh first"; exit 1; }

t0=$(date +%s)
suffix=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
if [ -n "${SKIP_BUILD:-}" ] && [ -f "torchrec_tt/_C$suffix" ]; then
  echo "build: reusing torchrec_tt/_C$suffix"
else
  # In place (no pip): the machine has no package index for pip's build isolation.
  TORCH_CUDA_ARCH_LIST=9.0 TORCHREC_TT_CUDA=1 MAX_JOBS=32 \
    timeout "${BUILD_TIMEOUT:-240}" python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { echo "build failed (or timed out), see build.log:"; grep -E "error" "$OUT/build.log" | head -30; tail -20 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# setup.py maps sharding/ to torchrec_tt.sharding; an in-place build has no such mapping, so
# link it (the link is git-ignored).
ln -sfn ../sharding torchrec_tt/sharding

# The TT op must run on CUDA (the benchmark measures its FLOP rate and plans with it).
python3 - <<'EOF' || { echo "the TT CUDA op does not run"; exit 1; }
import torch
from torchrec_tt import make_tt_shape
from torchrec_tt.ops import PoolingMode, TTBatchLayout, tt_embedding_bag
shape = make_tt_shape(1000, 16, [4, 4])
cores = [torch.randn(r, c, device="cuda") for r, c in shape.core_shapes()]
layout = TTBatchLayout.from_shapes(["t"], [shape], [PoolingMode.SUM], [0])
out = tt_embedding_bag(cores, layout, torch.arange(8, device="cuda"), torch.arange(0, 9, 2, device="cuda"))
torch.cuda.synchronize()
print("TT CUDA op: ok", tuple(out.shape))
EOF

args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--configs uncompressed,tt,tt_dp)
t0=$(date +%s)
timeout "${BENCH_TIMEOUT:-240}" torchrun --standalone --nproc_per_node 2 bench/bench_sharded.py "${args[@]}" 2>&1 \
  | tee "$OUT/sharded.txt"
rc=${PIPESTATUS[0]}
echo "bench: $(( $(date +%s) - t0 )) s, exit $rc; session: $(( $(date +%s) - t_start )) s"
exit "$rc"

#!/usr/bin/env bash
# GPU paths end to end on a machine with CUDA: the real-size step benchmark, the Kaggle-size stage table, then synth ->
# train (AMP, channels-last) -> predict -> evaluate with the demo recipe, and the same training through torchrun on
# two GPUs when there are two. Usage: bash scripts/gpu_check.sh OUTDIR
set -euo pipefail
out=${1:-/tmp/reid-gpu}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, faiss; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'faiss gpus', getattr(faiss, 'get_num_gpus', lambda: 0)())"
python3 scripts/bench.py --only gpu
python3 scripts/bench.py --only scale --out "$out/bench"  # the whole flow at Kaggle's size, stage by stage
python3 -m reid.cli synth "$out/synth" --individuals 300 --jobs 8 > /dev/null
python3 -m reid.cli train --config configs/demo.yaml --data "$out/synth" --out "$out/run" data.num_workers=8 \
  train.device=cuda 2>&1 | grep -v "it/s\]" | grep -E "INFO|error|Error" || true
python3 -m reid.cli predict --run "$out/run" --data "$out/synth" 2>&1 | grep -E "INFO|error" || true
python3 -m reid.cli evaluate "$out/run/submission.csv" "$out/synth/solution.csv"
# several GPUs: the same run through torchrun, one process per GPU (NCCL), batch per process halved
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
  python3 -m torch.distributed.run --standalone --nproc_per_node=2 -m reid train --config configs/demo.yaml \
    --data "$out/synth" --out "$out/run2" data.num_workers=4 train.device=cuda train.batch_size=16 2>&1 |
    grep -E "INFO|error|Error" || true
fi

#!/usr/bin/env bash
# What one GPU session runs (H100, 16 cores): device-decode tests on CUDA, then the extract
# throughput benchmark for both decoders and two encoders, on a 0.5 µm/px slide (one JPEG
# tile per patch) and a 0.25 µm/px slide (512 px read per patch: 4 tiles, downsampled).
# Usage: bash benchmarks/gpu_session.sh OUTDIR
set -u -o pipefail
out=${1:-/tmp/bench}; mkdir -p "$out"; work=$(mktemp -d)
export PYTHONUNBUFFERED=1
mk() { python3 -c "import sys; from pathlib import Path; from wsi_embed.synthetic import blob_slide; blob_slide(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[2]), mpp=float(sys.argv[3]))" "$@"; }
mk "$work/s050.svs" 36864 0.5
b() { echo "== $*"; python3 benchmarks/extract_throughput.py --num-workers 16 "$@" 2>&1 | grep -vi warn; }
{
b --slide "$work/s050.svs" --encoder kaiko_vitb16 --precision bf16 --decode cpu --no-reading
b --slide "$work/s050.svs" --encoder uni_v1 --decode cpu --no-reading --copies 3
b --slide "$work/s050.svs" --encoder kaiko_vitb16 --precision bf16 --decode gpu --no-reading
} 2>&1 | tee "$out/bench.log"
python3 -m pytest -q -s -p no:cacheprovider tests/test_gpu_decode.py -k extract 2>&1 | tail -3 | tee "$out/tests.log"

#!/usr/bin/env bash
# What one GPU session runs (H100, 16 cores): the CUDA-side tests (the feed stream, device
# decode, the pipeline's row order through the feed stream), then the extract throughput
# benchmark on a 0.5 µm/px slide (one JPEG tile per patch) for ViT-B/16 and ViT-L/16 and both
# decoders, then a py-spy profile of the ViT-B/16 run's main process where py-spy was carried.
# Usage: bash benchmarks/gpu_session.sh OUTDIR [1|2]   (1: benchmarks, then tests; 2: device
# decode and the profile; both by default)
set -u -o pipefail
out=${1:-/tmp/bench}; part=${2:-12}; mkdir -p "$out"; work=$(mktemp -d)
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
mk() { python3 -c "import sys; from pathlib import Path; from wsi_embed.synthetic import blob_slide; blob_slide(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[2]), mpp=float(sys.argv[3]))" "$@"; }
mk "$work/s050.svs" 36864 0.5
b() { echo "== $*"; timeout 200 python3 benchmarks/extract_throughput.py --num-workers 16 "$@" 2>&1 | grep -v "DeprecationWarning\|warnings.warn"; }
if [[ $part == *1* ]]; then
{
b --slide "$work/s050.svs" --encoder kaiko_vitb16 --precision bf16 --decode cpu --copies 4
b --slide "$work/s050.svs" --encoder uni_v1 --decode cpu --no-reading --copies 4
} 2>&1 | tee "$out/bench1.log"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_device_side.py tests/test_gpu_decode.py \
  tests/test_sources_conformance.py -k "device-jpeg or device_side or gpu_decode or row_i or batch_size" \
  "tests/test_extract.py::test_row_i_of_features_belongs_to_row_i_of_coords" \
  "tests/test_extract.py::test_features_do_not_depend_on_batch_size_or_worker_count" \
  2>&1 | tail -5 | tee "$out/tests.log"
fi
if [[ $part == *2* ]]; then
b --slide "$work/s050.svs" --encoder kaiko_vitb16 --precision bf16 --decode gpu --no-reading \
  2>&1 | tee "$out/bench2.log"
fi
if [[ $part == *2* ]] && command -v py-spy >/dev/null; then
  d=$work/prof; mkdir -p "$d/slides"; for i in 0 1 2; do ln -s "$work/s050.svs" "$d/slides/s$i.svs"; done
  python3 -m wsi_embed.cli tile "$d/slides" --out "$d" --tissue none --num-workers 0 --log-level WARNING
  timeout 150 py-spy record --nonblocking --threads --idle --rate 100 --format raw -o "$out/prof_vitb16.txt" -- \
    python3 -m wsi_embed.cli extract "$d/slides" --out "$d" --encoder kaiko_vitb16 --weights random \
    --precision bf16 --num-workers 16 --log-level INFO 2>&1 | grep -i "steady\|error\|warning" | tee "$out/prof.log"
fi

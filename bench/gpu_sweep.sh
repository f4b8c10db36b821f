#!/usr/bin/env bash
# One check-and-time sweep on a GPU machine: the CUDA-only tests first, then the benchmarks,
# each under a time guard so that one hang or slow step cannot take the others with it.
#
#   bash bench/gpu_sweep.sh [DIR] [SECTION ...]
#
# DIR (default bench/results/sweep-<date>) receives every table and log; SECTIONs (default:
# all, in this order): tests gluon sweep documents in-model flex-sites first-call doge generate;
# tests-extended, sweep-model, mods and d256 only when named.
set -u
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
out="${1:-bench/results/sweep-$(date -u +%Y%m%d-%H%M)}"
shift || true
sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(tests gluon sweep documents in-model flex-sites first-call doge generate)
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  git rev-parse --short HEAD 2>/dev/null; } > "$out/env.txt" 2>&1
cat "$out/env.txt"

step() {  # step NAME SECONDS COMMAND...: run with a guard, log to $out/NAME.log, print the tables
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "== $name rc=$?"
  grep "^|" "$out/$name.log" | cut -c1-300 | tail -40
  grep -E "passed|failed" "$out/$name.log" | tail -2
}

for section in "${sections[@]}"; do
  case $section in
    tests)
      SPARSE_COMPILE_KERNELS=gluon step tests 300 python3 -m pytest -q -p no:cacheprovider \
        tests/codegen/test_gluon.py tests/codegen/test_document_bounds.py \
        tests/codegen/test_relative_bias.py tests/codegen/test_decode.py ;;
    tests-extended)  # the opt-in Gluon variants: logit modifications, shifted positions, D 256
      SPARSE_COMPILE_KERNELS=gluon step tests-extended 420 python3 -m pytest -q \
        -p no:cacheprovider tests/codegen/test_gluon_score.py \
        tests/codegen/test_gluon_positions.py tests/codegen/test_gluon_key_mask.py \
        tests/codegen/test_gluon_bias.py
      SPARSE_COMPILE_KERNELS=gluon step tests-d256 200 python3 -m pytest -q \
        -p no:cacheprovider tests/codegen/test_gluon.py -k head_dim_256 ;;
    gluon)
      step gluon 560 python3 bench/gluon.py --dims 128,64 --lengths 16384,4096 --rep 40 \
        --out "$out/gluon.md" ;;
    sweep)
      step sweep 200 python3 bench/gluon.py --sweep --dims 128 --lengths 16384 \
        --patterns "causal & sliding(4096);local(1024)" --rep 20 --out "$out/gluon-sweep.md" ;;
    sweep-model)  # the tile and stage options at the in-model shape (16 / 4 heads, 32k)
      step sweep-model 300 python3 bench/gluon.py --sweep --dims 128 --lengths 32768 \
        --tokens 32768 --heads 16 --kv-heads 4 --rep 20 \
        --patterns "causal & sliding(1024);causal & sliding(4096)" \
        --out "$out/gluon-sweep-model.md" ;;
    mods)  # soft-capping, ALiBi, key masks in the Gluon kernels against the tl kernels and Flex
      for m in softcap alibi keys; do
        SPARSE_COMPILE_KERNELS=gluon step "mods-$m" 240 python3 bench/gluon.py --dims 128 \
          --lengths 16384 --patterns "causal & sliding(4096);local(1024)" --mods "$m" \
          --rep 20 --out "$out/gluon-$m.md"
      done ;;
    d256)  # head dim 256 (opt-in) against the tl kernels and Flex
      SPARSE_COMPILE_KERNELS=gluon step d256 300 python3 bench/gluon.py --dims 256 \
        --lengths 16384 --patterns "causal & sliding(4096);local(1024);causal" --rep 20 \
        --out "$out/gluon-d256.md" ;;
    documents)
      step documents 200 python3 bench/documents.py --steps 10 --out "$out/documents.md" ;;
    in-model)
      step in-model 300 python3 bench/in_model_kernels.py --length 32768 --window 4096 \
        --out "$out/in-model-kernels.md"
      step in-model-gluon 300 python3 bench/in_model_kernels.py --length 32768 --window 4096 \
        --kernels gluon --out "$out/in-model-kernels-gluon.md" ;;
    flex-sites)
      step flex-sites 400 python3 bench/models.py --family mistral --lengths 32768 \
        --windows 4096 --profile --variants sparse-on-flex flex sparse \
        --out "$out/models-sparse-on-flex.md"
      # a user pattern on top of the model's own window; flex gets the pattern by hand
      step flex-sites-on-top 240 python3 bench/models.py --family mistral --lengths 32768 \
        --windows 1024 --model-window 4096 --modes train --profile \
        --variants sparse-on-flex flex --out "$out/models-sparse-on-flex-on-top.md" ;;
    first-call)  # each variant in a fresh process, about 80 s each at 32k (the last may be cut)
      step first-call 400 python3 bench/first_call.py --length 32768 --window 4096 \
        --variants sparse flex sparse-threads sparse-no-precompile --out "$out/first-call.md" ;;
    doge)
      step doge 300 python3 bench/doge_step.py --length 32768 --out "$out/doge-step.md" ;;
    generate)
      step generate 300 python3 bench/generate.py --context 32768 --batch 1 32 --new 32 \
        --variants sparse --out "$out/generate.md" ;;
    *) echo "unknown section $section" ;;
  esac
done

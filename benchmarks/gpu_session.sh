#!/usr/bin/env bash
# One lease on a lent GPU machine (whose python3 already has jax[cuda], flax, optax): benchmarks/gpu.py
# once per setting, each in its own process (so each reports its own peak memory and an out-of-memory
# failure costs only that setting), most important first, stopping before a deadline.
#   bash benchmarks/gpu_session.sh OUT_DIR [SECONDS] [SETTING ...]
set -u
out=${1:?output folder}; budget=${2:-540}; shift $(( $# > 1 ? 2 : $# ))
settings=("$@")
[ ${#settings[@]} -gt 0 ] || settings=(299:64 1024:16:remat 299:64:cpu 1024:16 299:128)
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
end=$((SECONDS + budget))
for setting in "${settings[@]}"; do
  left=$((end - SECONDS))
  if [ "$left" -lt 60 ]; then echo "skipped $setting: ${left}s left"; continue; fi
  name=${setting//:/_}
  timeout "$left" python3 benchmarks/gpu.py --configs "$setting" --steps 10 --out "$out/gpu_$name.json" \
    > "$out/gpu_$name.log" 2>&1
  echo "$setting exit $?: $(grep -v -i -E 'warn|^ *$' "$out/gpu_$name.log" | tail -2 | head -1)"
done
cat "$out"/gpu_*.json 2>/dev/null

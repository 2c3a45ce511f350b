#!/usr/bin/env bash
# The four benchmarks at GPU batch sizes, each report written to $1/<name>.txt.
#
#   bash bench/gpu.sh OUT_DIR [MODEL]
#   ONLY="grpo rl_cli" bash bench/gpu.sh OUT_DIR      # some of them: sft_small sft_large dpo rm grpo rl_cli
#
# MODEL defaults to a random-weight copy of the embedded model's architecture made by
# bench/random_checkpoint.py from .devcarry/smollm2 (config + tokenizer): the GPU machine has
# no network and cannot receive the embedded GGUF, and speed depends on shapes, not values.
# Each benchmark has a time limit so one stuck run cannot take the others' time.
set -u
out=${1:?usage: bash bench/gpu.sh OUT_DIR [MODEL]}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
model=${2:-}
if [ -z "$model" ]; then
    model=/tmp/smollm2-random
    python3 bench/random_checkpoint.py init --like .devcarry/smollm2 --out "$model" 2>&1 | tail -1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, accelerate, trl, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)"
cd bench
only=" ${ONLY:-sft_small sft_large dpo rm grpo rl_cli} "
run() {  # name, limit in seconds, script and its options
    local name=$1 limit=$2; shift 2
    [[ $only == *" $name "* ]] || return 0
    echo "=== $name: $*"
    timeout "$limit" python3 "$@" --model "$model" > "$out/$name.txt" 2>&1
    echo "exit $?"; grep -E "^(ours|TRL|ratio|sampler)" "$out/$name.txt" | head -20
}
run sft_small   90 sft_vs_trl.py --steps 10 --warmup 3
run sft_large   120 sft_vs_trl.py --examples 64 --tasks-per-example 8 --max-length 1024 --steps 10 --warmup 3
run dpo         90 dpo_vs_trl.py --pairs 32 --steps 10 --warmup 3
run rm          90 rm_vs_trl.py --pairs 32 --steps 10 --warmup 3
run grpo        150 grpo_vs_trl.py --prompts 16 --group 8 --max-new-tokens 128 --fixed-length --steps 4 --warmup 1 --gen-repeats 2
# GRPO, PPO and ReMax through the CLI, two steps each: every online recipe's GPU path
# (reference copy, sampler, value head) end to end.
if [[ $only == *" rl_cli "* ]]; then
    for algo in grpo ppo remax; do
        echo "=== rl_cli: rlhf $algo"
        timeout 120 python3 -m rlhfkit.cli "$algo" --model "$model" --tasks demo --reward gold --max-steps 2 \
            --prompts-per-step 8 --max-new-tokens 32 --output-dir "/tmp/rl_$algo" --no-progress \
            > "$out/rl_$algo.txt" 2>&1
        echo "exit $?"; tail -2 "$out/rl_$algo.txt"
    done
fi

#!/usr/bin/env bash
# Run every benchmark with the final settings on a quiet machine. Each part writes its Markdown table
# (<name>.md, exactly what the script printed), raw numbers (<name>.json) and plot (<name>.png) into
# benchmarks/results/, then benchmarks/RESULTS.md is rebuilt from them. Progress goes to stderr.
# Parts: `benchmarks/run_all.sh storage accuracy` runs two; `cpu` runs every CPU part on this machine in one go
# (so every CPU table of RESULTS.md comes from one machine): about 2 h 20 min on the quiet 2-core AMD EPYC VM (2½ hours
# on the Intel Xeon one) for everything but the accuracy parts, which add minutes with their trial cache
# (runs/accuracy_cache) and about an hour without it (AMD: accuracy 36 min, accuracy_study 15, accuracy_transfer 7).
# `gpu` first runs the CUDA tests (bases bit-identical to the CPU's golden values; a model moved to CUDA gives the CPU
# logits; their output in gpu_cuda_tests.txt; skipped, saying so, without pytest), then the bf16 training-step tables;
# a failed CUDA test makes the script exit 4 once RESULTS.md is rebuilt. A SIGTERM or Ctrl-C stops the script at once,
# the running part's processes with it (their previous results kept). A failed GPU table does not stop the other
# (device time is scarce): RESULTS.md is rebuilt from what ran, and the script exits 1 naming it. Without peft its
# rows are left out; without matplotlib no plot is drawn. Named, it fails before anything runs where torch sees no
# CUDA; in the default run it is skipped there.
# With no part named, `cpu` then `gpu`. Every name is checked before anything runs; -h lists them.
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"  # for -h, read after the cd below
# python, or python3 where only that exists (a bare GPU machine); $PYTHON, a path from where the script was started
py=${PYTHON:-$(command -v python || command -v python3 || echo python)}
if [[ $py == */* ]]; then py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")"; fi
cd "$(dirname "$0")/.."
# The scripts import nola_vision from this checkout, installed or not (python benchmarks/x.py puts only benchmarks/ on
# the path): a bare GPU machine with torch and timm alone runs them.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out=benchmarks/results
mkdir -p "$out"
python() { command "$py" "$@"; }

# A part runs in the background in a process group of its own (job control on while it starts), waited for: bash
# runs a trap only once a foreground command ends, so a SIGTERM sent to this script alone would wait for the whole
# part and then discard its result; and its group is ended whole, the script's measuring workers with it, where
# a process between them may be gone already.
start_part() {  # start_part <command...>: run it so, its group's id in part_pid
    set -m
    ("$@") &
    part_pid=$!
    set +m
}

end_part() {  # end_part: SIGTERM to the running part's process group, then wait for it
    if [ -n "${part_pid:-}" ]; then
        kill -TERM -- "-$part_pid" 2>/dev/null || kill -TERM "$part_pid" 2>/dev/null || true
        wait "$part_pid" 2>/dev/null || true
        part_pid=
    fi
}

stop_part() {  # stop_part <name> <exit code>: end the part's processes, keep its previous results, exit
    end_part
    restore_previous "$1"
    echo "== $1 stopped: its previous table, numbers and plot are kept" >&2
    exit "$2"
}

restore_previous() {  # restore_previous <name>: put back the part's numbers and plot kept before it ran
    local kind
    for kind in json png; do
        if [ -e "$out/.$1.$kind.previous" ]; then mv "$out/.$1.$kind.previous" "$out/$1.$kind"; fi
    done
    rm -f "$out/.$1.md.new"
}

part_table() {  # part_table <name> <script> [args...]: the part's script, its table also into .<name>.md.new
    local name=$1 script=$2
    shift 2
    python "benchmarks/$script" "$@" --json "$out/$name.json" --png "$out/$name.png" | tee "$out/.$name.md.new"
}

run() {  # run <name> <script> [args...]
    local name=$1 script=$2
    shift 2
    echo "== $name: python benchmarks/$script $*" >&2
    local start=$SECONDS kind
    # Until the part succeeds its table goes to .<name>.md.new and its previous numbers and plot are kept aside, so a
    # part that fails or is stopped (SIGTERM, Ctrl-C) leaves the previous table, numbers and plot as they were.
    for kind in json png; do
        if [ -e "$out/$name.$kind" ]; then cp -p "$out/$name.$kind" "$out/.$name.$kind.previous"; fi
    done
    trap 'stop_part "$name" 143' TERM
    trap 'stop_part "$name" 130' INT
    start_part part_table "$name" "$script" "$@"
    if wait "$part_pid"; then
        part_pid=
        mv "$out/.$name.md.new" "$out/$name.md"
        rm -f "$out/.$name.json.previous" "$out/.$name.png.previous"
    else
        part_pid=
        restore_previous "$name"
        echo "== $name failed after $((SECONDS - start)) s: its previous table, numbers and plot are kept" >&2
        trap - TERM INT
        if [ "$keep_going" = 1 ]; then failed_parts+=("$name"); return 0; fi
        exit 1
    fi
    trap - TERM INT
    echo "== $name took $((SECONDS - start)) s" >&2
}

has_cuda() { python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; }

stop_cuda_tests() {  # stop_cuda_tests <exit code>: end the CUDA tests, keep the last whole log, exit
    end_part
    rm -f "$out/.gpu_cuda_tests.txt.new"
    echo "== gpu: the CUDA tests stopped: $out/gpu_cuda_tests.txt is the last whole run's" >&2
    exit "$1"
}

cuda_test_log() {  # the CUDA tests, their output also into .gpu_cuda_tests.txt.new
    python -m pytest -q -p no:cacheprovider tests/test_basis.py tests/test_inject.py -k cuda 2>&1 \
        | tee "$out/.gpu_cuda_tests.txt.new" >&2
}

cuda_tests() {  # the CUDA tests, into a new log that replaces the old once they end; a failure fails the exit only
    echo "== gpu: the CUDA tests" >&2
    trap 'stop_cuda_tests 143' TERM
    trap 'stop_cuda_tests 130' INT
    # as a part (start_part), not in the foreground: pytest takes a Ctrl-C as a failed run, and the script went on
    start_part cuda_test_log
    wait "$part_pid" || cuda_tests_failed=1  # the tables still run
    part_pid=
    trap - TERM INT
    mv "$out/.gpu_cuda_tests.txt.new" "$out/gpu_cuda_tests.txt"
}

part() {
    case $1 in
        storage) run storage storage.py ;;
        inference) run inference inference.py --model vit_base_patch16_224 --batch 32 --rounds 7 --switches 20 ;;
        compiled_switch) run compiled_switch compiled_switch.py --model vit_base_patch16_224 --batch 1 --switches 20 ;;
        onnx_tasks) run onnx_tasks onnx_tasks.py --model vit_base_patch16_224 --batches 1 32 --rounds 5 ;;
        multitask) run multitask multitask.py --model vit_base_patch16_224 --batch 64 --tasks 1 8 64 --registered 1 100 1000 --rounds 3 ;;
        nola_vs_lora)  # the targets: NOLA-MLP (codes released / held) against LoRA q,v, 1 thread, fp32 and bf16: memory per process, time paired in one process
            local precision
            for precision in fp32 bf16; do
                local tag=${precision/fp32/}
                run "nola_vs_lora${tag:+_$tag}_vit_b" train_step.py --model vit_base_patch16_224 --batch 8 --steps 3 --warmup 1 --rounds 3 --threads 1 --methods lora nola nola_held --paired 20 --precision $precision
                run "nola_vs_lora${tag:+_$tag}_vit_l" train_step.py --model vit_large_patch16_224 --batch 4 --steps 3 --warmup 1 --rounds 3 --threads 1 --methods lora nola nola_held --paired 20 --precision $precision
            done ;;
        launch_bound)  # the host's cost of a step with an accelerator's choices: what bounds a GPU step launched op by op
            run launch_bound_vit_b launch_bound.py --model vit_base_patch16_224 --rounds 150 --steps 3
            run launch_bound_vit_l launch_bound.py --model vit_large_patch16_224 --rounds 150 --steps 3 ;;
        profile)
            run profile_step profile_step.py --models vit_base_patch16_224:8 vit_large_patch16_224:4 --steps 3 --threads 1
            run profile_step_bf16 profile_step.py --models vit_base_patch16_224:8 vit_large_patch16_224:4 --steps 3 --threads 1 --precision bf16 ;;
        train_step) run train_step_vit_b train_step.py --model vit_base_patch16_224 --batch 8 --steps 3 --warmup 1 --rounds 3 ;;
        train_step_1thread) run train_step_vit_b_1thread train_step.py --model vit_base_patch16_224 --batch 8 --steps 3 --warmup 1 --threads 1 ;;
        train_step_large) run train_step_vit_l train_step.py --model vit_large_patch16_224 --batch 4 --steps 2 --warmup 1 --rounds 2 ;;
        train_step_compile)
            run compile_step_vit_b train_step.py --model vit_base_patch16_224 --batch 8 --steps 3 --warmup 2 --rounds 1 --methods lora nola --compile
            run compile_step_vit_l train_step.py --model vit_large_patch16_224 --batch 4 --steps 2 --warmup 2 --rounds 1 --methods lora nola --compile ;;
        grad_checkpointing)  # the same step with timm's set_grad_checkpointing off and on; time paired in one process
            run grad_ckpt_off_vit_b train_step.py --model vit_base_patch16_224 --batch 8 --steps 3 --warmup 1 --rounds 2 --methods lora nola --paired 10
            run grad_ckpt_on_vit_b train_step.py --model vit_base_patch16_224 --batch 8 --steps 3 --warmup 1 --rounds 2 --methods lora nola --paired 10 --grad-checkpointing ;;
        sweep_k) run sweep_k train_step.py --model vit_base_patch16_224 --batch 8 --steps 2 --warmup 1 --sweep k ;;
        sweep_layers) run sweep_layers train_step.py --model vit_base_patch16_224 --batch 8 --steps 2 --warmup 1 --sweep layers ;;
        accuracy)  # lr, head lr and warm-up chosen on validation (stage 1: shared lr; stage 2: points around each best)
            run accuracy accuracy.py --shots 5 10 --seeds 0 1 2 --val-shots 10 --image-size 56 --epochs 20 --threads 1 \
                --jobs 2 --top 3 --methods linear lora_r4 nola_1024 --lrs 1e-3 3e-3 1e-2 3e-2 1e-1 --warmup-epochs 0 2 \
                --extra nola_1024:2e-2:same --extra nola_1024:2e-2:1e-2 --extra nola_1024:2e-2:3e-3 \
                --extra nola_1024:1e-2:3e-3 --extra lora_r4:3e-3:1e-2 --extra lora_r4:5e-3:3e-3 \
                --extra lora_r4:5e-3:1e-2 --extra nola_1024:2e-2:1e-2:2 --extra nola_1024:3e-2:1e-2:2 \
                --extra nola_1024:3e-2:3e-3:2 --extra nola_1024:4e-2:1e-2:2 --extra lora_r4:5e-3:3e-3:2 \
                --extra lora_r4:1e-2:3e-3:2 --cache runs/accuracy_cache --import-trials "$out/study_lr_stage1.json" ;;
        accuracy_study)  # what NOLA needs, at the NOLA recipe (5-shot); the twice-larger budgets also at smaller lrs
            run accuracy_study accuracy.py --shots 5 --seeds 0 1 2 --val-shots 10 --image-size 56 --epochs 20 \
                --threads 1 --jobs 2 --no-ptq --methods nola_1024 nola_qv_1024 nola_mlp_qv_512 nola_1024_zero nola_512 nola_2048 \
                nola_1024_c4 nola_1024_c025 nola_1024_per_layer nola_mlp_qv_1024 \
                --lrs 3e-2 --head-lrs 1e-2 --warmup-epochs 2 --extra nola_2048:1e-2:1e-2:2 --extra nola_2048:2e-2:1e-2:2 \
                --extra nola_mlp_qv_1024:1e-2:1e-2:2 --extra nola_mlp_qv_1024:2e-2:1e-2:2 --cache runs/accuracy_cache ;;
        accuracy_transfer)  # the digits recipes on another dataset: each method at its recipe and its neighbours
            run accuracy_transfer accuracy.py --dataset fashion_mnist --test-limit 1000 --shots 5 --seeds 0 1 2 \
                --val-shots 10 --image-size 56 --epochs 20 --threads 1 --jobs 2 --no-ptq --methods linear lora_r4 nola_1024 \
                --lrs --extra linear:1e-2:1e-2 --extra linear:3e-2:3e-2 --extra linear:1e-2:1e-2:2 --extra linear:3e-2:3e-2:2 \
                --extra lora_r4:3e-3:3e-3 --extra lora_r4:5e-3:3e-3 --extra lora_r4:5e-3:3e-3:2 --extra lora_r4:1e-2:3e-3:2 \
                --extra nola_1024:1e-2:1e-2 --extra nola_1024:2e-2:1e-2 --extra nola_1024:2e-2:1e-2:2 \
                --extra nola_1024:3e-2:1e-2:2 --cache runs/accuracy_cache ;;
        gpu)
            if has_cuda; then
                if python -c "import pytest" 2>/dev/null; then
                    cuda_tests
                else
                    echo "== gpu: pytest is not installed, so the CUDA tests do not run ($out/gpu_cuda_tests.txt is" \
                         "left as it was): pip install pytest, or pip install -e '.[dev]', to run them" >&2
                fi
                local methods=(linear lora nola nola_per_layer peft_lora peft_vera peft_fourierft)
                if ! python -c "import peft" 2>/dev/null; then
                    echo "== gpu: peft is not installed: its rows are left out" >&2
                    methods=(linear lora nola nola_per_layer)
                fi
                keep_going=1
                run gpu_train_step_vit_b train_step.py --device cuda --precision bf16 --model vit_base_patch16_224 --batch 32 --steps 20 --warmup 5 --methods "${methods[@]}"
                run gpu_train_step_vit_l train_step.py --device cuda --precision bf16 --model vit_large_patch16_224 --batch 32 --steps 20 --warmup 5 --methods "${methods[@]}"
                keep_going=0
            else
                echo "== gpu: skipped (no CUDA device)" >&2
            fi ;;
        *) echo "unknown part $1" >&2; exit 2 ;;
    esac
}

cpu_parts=(storage inference compiled_switch onnx_tasks multitask nola_vs_lora launch_bound profile train_step train_step_1thread train_step_large train_step_compile
           grad_checkpointing sweep_k sweep_layers accuracy accuracy_study accuracy_transfer)
parts=("$@")
named=1
[ ${#parts[@]} -gt 0 ] || { parts=(cpu gpu); named=0; }
known=" cpu gpu ${cpu_parts[*]} "
for name in "${parts[@]}"; do
    case $name in
        -h|--help)
            sed -n '2,/^set /p' "$self" | sed '$d' | sed 's/^# \{0,1\}//'
            echo "parts: cpu gpu ${cpu_parts[*]}"
            exit 0 ;;
    esac
    if [[ $known != *" $name "* ]]; then
        echo "unknown part $name: choose from cpu gpu ${cpu_parts[*]} (nothing was run)" >&2; exit 2
    fi
    if [ "$name" = gpu ] && [ "$named" = 1 ] && ! has_cuda; then
        echo "gpu: torch sees no CUDA device here (torch.cuda.is_available() is False; nothing was run)" >&2; exit 3
    fi
done
cuda_tests_failed=0
keep_going=0
failed_parts=()
for name in "${parts[@]}"; do
    if [ "$name" = cpu ]; then
        for cpu_part in "${cpu_parts[@]}"; do part "$cpu_part"; done
    else
        part "$name"
    fi
done
python benchmarks/collect_results.py  # RESULTS.md from everything in results/
if [ ${#failed_parts[@]} -gt 0 ]; then
    echo "failed: ${failed_parts[*]} (their previous tables are kept; the others are in RESULTS.md)" >&2
fi
if [ "$cuda_tests_failed" = 1 ]; then
    echo "gpu: a CUDA test failed: see $out/gpu_cuda_tests.txt" >&2; exit 4
fi
if [ ${#failed_parts[@]} -gt 0 ]; then exit 1; fi

#!/usr/bin/env bash
# A stand-in for a carried CUDA kernel-test binary in `scripts/gpu_check.sh --dry-run`: it answers
# like libtest, with one test that fails whenever it runs (its lever must be left out of the
# sweep) and one that fails only after it in the same process (a victim, which must not be).
set -u
tests=(group_norm_matches_composition geglu_matches_composition conv2d_cuda_matches_cpu_reference)
case "${1:-}" in
    --list) for t in "${tests[@]}"; do echo "$t: test"; done; exit 0 ;;
    --exact)
        echo "running 1 test"
        if [ "$2" = geglu_matches_composition ]; then
            echo "test $2 ... FAILED"; exit 101
        fi
        echo "test $2 ... ok"; exit 0 ;;
esac
echo "running ${#tests[@]} tests"
echo "test ${tests[0]} ... ok"
echo "test ${tests[1]} ... FAILED"
echo "test ${tests[2]} ... FAILED"
echo "test result: FAILED. 1 passed; 2 failed"
exit 101

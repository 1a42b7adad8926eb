#!/usr/bin/env bash
# nvcc as .ci/run's CUDA compile check calls it (NVCC=scripts/lib/nvcc_check.sh, the real nvcc
# in TURBINE_REAL_NVCC). That check links nothing and runs nothing, so one kind of compile is
# made cheaper, and only that one: an object compile (`-c`), which in this build is only
# candle-kernels' static library of MoE and GGUF matmul kernels (libmoe.a, which turbine never
# calls). Its 15 sources took about 7 of the phase's 9.5 minutes on a slow 2-core machine,
# almost all of it in cicc's and ptxas' optimisers. Here they are compiled with the device
# optimiser off, to PTX only (no SASS): every source is still preprocessed, parsed,
# instantiated and turned into device code, so a source that does not compile still fails the
# check, in about a quarter of the time. PTX compiles (`--ptx`: candle's kernels and turbine's
# own, which CI then assembles with ptxas for sm_90) and every other call are passed on as
# they are. scripts/build_cuda.sh, which builds the binary that runs, does not use this.
set -euo pipefail
real=${TURBINE_REAL_NVCC:?set TURBINE_REAL_NVCC to the real nvcc}
object=0
args=()
for arg in "$@"; do
  case $arg in
    -c) object=1 ;;
    # -gencode=arch=compute_90a,code=sm_90a -> code=compute_90a: PTX in the object, no ptxas.
    -gencode=arch=*,code=*)
      arch=${arg#-gencode=arch=}
      arch=${arch%%,*}
      arg="-gencode=arch=$arch,code=$arch"
      ;;
  esac
  args+=("$arg")
done
if [ "$object" = 0 ]; then
  exec "$real" "$@"
fi
exec "$real" "${args[@]}" -Xcicc -O0

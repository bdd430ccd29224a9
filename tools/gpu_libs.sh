# Sourced by the GPU scripts (tools/gpu_check.sh, tools/gpu_profile.sh): Tideway loads libcuda,
# libnvrtc, libcublas and libnccl at run time by name (cudarc's dynamic loading, which tries
# the unversioned names first). This finds them (the driver, a CUDA toolkit, or pip's nvidia-*
# wheels: CUDA 13's lie under nvidia/cu13/lib), links them under unversioned names in a
# temporary folder, and puts it and the libraries' own folders on LD_LIBRARY_PATH (NVRTC loads
# its builtins library by its versioned name).
libs="$(mktemp -d)"
trap 'rm -rf "$libs"' EXIT
search=(/usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/local/cuda/lib64
        /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu /usr/lib64)
for py in ${PYTHON:-} python3 /opt/torch/.venv/bin/python3; do
    if command -v "$py" >/dev/null 2>&1; then
        while IFS= read -r dir; do search+=("$dir"); done < <("$py" - <<'PY' 2>/dev/null || true
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
for root in roots:
    for d in glob.glob(os.path.join(root, "nvidia", "*", "lib")):
        print(d)
PY
)
    fi
done
for lib in cuda nvrtc nvrtc-builtins cublas cublasLt nccl; do
    found=""
    for dir in "${search[@]}"; do
        for f in "$dir/lib$lib.so" "$dir"/lib"$lib".so.[0-9]*; do
            if [ -e "$f" ]; then found="$f"; break 2; fi
        done
    done
    if [ -n "$found" ]; then
        ln -sf "$found" "$libs/lib$lib.so"
        lib_dirs="${lib_dirs:-}:$(dirname "$found")"
        echo "lib$lib: $found" >&2
    else
        echo "lib$lib: not found (searched ${search[*]})" >&2
    fi
done
export LD_LIBRARY_PATH="$libs${lib_dirs:-}:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}"


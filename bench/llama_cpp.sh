#!/usr/bin/env bash
# llama.cpp for the same-run peers, sourced by the benchmark scripts (bench/generate.sh,
# bench/cpu_decode.sh): built from the llama-cpp-python 0.3.36 source package (its
# vendor/llama.cpp) under target/llama/, downloaded from PyPI if missing, and HF checkpoints
# converted to GGUF with its own converter.
#
#   source bench/llama_cpp.sh
#   llama_build llama-batched-bench ...     # the tools, under $llama_bin
#   gguf=$(llama_gguf MODEL_DIR f32|f16|q8_0)
#
# With TIDEWAY_SIMD=avx2 in the environment (Tideway's cap, kernels/src/cpu.rs) llama.cpp is
# built for AVX2 and FMA without AVX-512 (build-avx2/), the peer of a CPU without AVX-512;
# with TIDEWAY_SIMD=avxvnni, for AVX2, FMA and AVX-VNNI (build-avxvnni/).
#
# The converter is run with the pre-tokenizer check told "gpt-2" (a tokenizer.json trained
# here is a byte-level BPE whose hash llama.cpp does not know: the benchmarks feed ids, so the
# vocabulary only has to load) and the tokenizer read as tokenizer.json says.
venv=${venv:-.venv}
llama_src=target/llama/llama_cpp_python-0.3.36
llama=$llama_src/vendor/llama.cpp
if [ "${TIDEWAY_SIMD:-}" = avx2 ] || [ "${TIDEWAY_SIMD:-}" = avxvnni ]; then
    avx_vnni=OFF
    [ "$TIDEWAY_SIMD" = avxvnni ] && avx_vnni=ON
    llama_build_dir=$llama/build-$TIDEWAY_SIMD
    llama_simd=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
        -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF
        -DGGML_AVX_VNNI=$avx_vnni -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
else
    llama_build_dir=$llama/build
    llama_simd=(-DGGML_NATIVE=ON)
fi
llama_bin=$llama_build_dir/bin

llama_build() {
    if [ ! -d "$llama_src" ]; then
        mkdir -p target/llama
        # PyPI's simple index in JSON (its /pypi/…/json API is not reachable from every
        # machine that reaches the index).
        local url
        url=$(curl -s -H "Accept: application/vnd.pypi.simple.v1+json" \
            https://pypi.org/simple/llama-cpp-python/ | python3 -c \
            'import json,sys; print([f["url"] for f in json.load(sys.stdin)["files"] if f["filename"]=="llama_cpp_python-0.3.36.tar.gz"][0])')
        curl -sL -o target/llama/llama.tar.gz "$url"
        tar xzf target/llama/llama.tar.gz -C target/llama
    fi
    local missing=
    for t in "$@"; do [ -x "$llama_bin/$t" ] || missing=1; done
    if [ -n "$missing" ]; then
        "$venv/bin/pip" install -q cmake
        # -march=native without AMX: these machines list amx_* in /proc/cpuinfo, but the
        # guest may not use them (llama.cpp's q8_0 path died of SIGILL with them, 2026-12-02).
        local no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        "$venv/bin/cmake" -S "$llama" -B "$llama_build_dir" -DCMAKE_BUILD_TYPE=Release "${llama_simd[@]}" \
            -DCMAKE_C_FLAGS="$no_amx" -DCMAKE_CXX_FLAGS="$no_amx" \
            -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
        "$venv/bin/cmake" --build "$llama_build_dir" -j"$(nproc)" --target "$@" >/dev/null
    fi
}

llama_gguf() {
    local model=$1 type=$2
    local gguf=target/llama/$(basename "$model")-$type.gguf
    if [ ! -f "$gguf" ]; then
        echo "converting $model to $gguf" >&2
        PYTHONPATH="$llama/gguf-py" "$venv/bin/python" - "$llama" "$model" "$gguf" "$type" \
            >"$gguf.log" 2>&1 <<'PY'
import sys
from pathlib import Path
llama, model, out, outtype = sys.argv[1:]
sys.path.insert(0, llama)
sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", outtype, "--outfile", out]
import conversion.base
import transformers
# The tokenizer as tokenizer.json says (AutoTokenizer would pick GPT-NeoX's class for a
# Mamba, which adds a padding token past the vocabulary).
transformers.AutoTokenizer.from_pretrained = staticmethod(
    lambda d, **kw: transformers.PreTrainedTokenizerFast(tokenizer_file=str(Path(d) / "tokenizer.json")))
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf as convert
convert.main()
PY
    fi
    echo "$gguf"
}

#!/usr/bin/env bash
# Runs the Vulkan backend on a GPU machine that has NVIDIA's driver and Vulkan
# ICD but no Vulkan loader: the conformance suite and `inflight repro
# --backend vulkan`, logs in $OUT. Run from the repository root.
#
# Prepare here (Debian 12, amd64), then carry .vkbin and .vkdebs (git-ignored):
#   cargo build --release -p inflight-cli --features vulkan
#   cargo test --release -p inflight --features vulkan --test vulkan_conformance --no-run
#   mkdir -p .vkbin && cp target/release/inflight .vkbin/
#   cp "$(ls -t target/release/deps/vulkan_conformance-* | grep -v '\.d$' | head -1)" .vkbin/vulkan_conformance
#   strip .vkbin/*
#   mkdir -p .vkdebs && (cd .vkdebs && apt-get download libvulkan1:amd64 \
#     vulkan-validationlayers:amd64 libstdc++6:amd64 libgcc-s1:amd64 \
#     libglvnd0:amd64 libglx0:amd64 libegl1:amd64 libgl1:amd64 libopengl0:amd64)
# The glvnd packages matter: NVIDIA's ICD is libGLX_nvidia.so.0, which needs
# libGLdispatch; without it the loader says "Could not get 'vkCreateInstance'
# via 'vk_icdGetInstanceProcAddr' for ICD libGLX_nvidia.so.0" (as on the
# H100 machine).
# Device call: run(command="bash scripts/device-vulkan.sh", carry=[".vkbin", ".vkdebs"])
#
# The .debs are unpacked with `dpkg -x` (else `ar` + tar) into a prefix under
# /tmp, never into /. libstdc++6/libgcc-s1 are used only if the layer cannot
# load with the host's own. Environment knobs: ALLOCS (default 100000),
# BUFFERS (8), IMMEDIATE=1 to also run the immediate policy (off by default:
# on a real GPU a release in flight is a real fault).
set -u
OUT=${OUT:-/tmp/inflight-vulkan-out}
mkdir -p "$OUT"
ROOT=$(pwd)
PREFIX=$(mktemp -d /tmp/vkroot.XXXXXX)
S="$OUT/summary.txt"
say() { echo "== $*" >> "$S"; }

{ uname -a; ldd --version 2>&1 | head -1; nvidia-smi -L 2>&1; ls -l /usr/local/nvidia/share/vulkan/icd.d/ 2>&1; } > "$OUT/machine.txt"

unpack() { # deb dir
  if command -v dpkg >/dev/null; then dpkg -x "$1" "$2" && return; fi
  local t; t=$(mktemp -d)
  (cd "$t" && ar x "$1" && tar -xf data.tar.* -C "$2") || say "cannot unpack $1"
  rm -rf "$t"
}
mkdir -p "$PREFIX/extra"
for d in "$ROOT"/.vkdebs/*.deb; do
  case "$(basename "$d")" in
    libstdc++6_*|libgcc-s1_*) unpack "$d" "$PREFIX/extra" ;;
    *) unpack "$d" "$PREFIX" ;;
  esac
done
LIB=$PREFIX/usr/lib/x86_64-linux-gnu
export LD_LIBRARY_PATH="$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
export VK_ICD_FILENAMES=$VK_DRIVER_FILES
export __EGL_VENDOR_LIBRARY_FILENAMES=${__EGL_VENDOR_LIBRARY_FILENAMES:-/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json}
export VK_ADD_LAYER_PATH=$PREFIX/usr/share/vulkan/explicit_layer.d
LAYER=$LIB/libVkLayer_khronos_validation.so
ldd "$LAYER" > "$OUT/layer-ldd.txt" 2>&1
if grep -q "not found" "$OUT/layer-ldd.txt"; then
  say "layer needs Debian's libstdc++: adding it"
  export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$PREFIX/extra/usr/lib/x86_64-linux-gnu"
  ldd "$LAYER" >> "$OUT/layer-ldd.txt" 2>&1
fi
export INFLIGHT_VULKAN_VALIDATION=1
[ -f "$LAYER" ] || { say "no validation layer: running without it"; export INFLIGHT_VULKAN_VALIDATION=0; }
ldd .vkbin/inflight > "$OUT/inflight-ldd.txt" 2>&1

L=$OUT
# shellcheck source=scripts/device-lib.sh
. "$ROOT/scripts/device-lib.sh"
step loader-probe 60 env VK_LOADER_DEBUG=error,warn,driver,layer \
  .vkbin/inflight repro --backend vulkan --allocations 200 -q
step conformance 180 env CI=true .vkbin/vulkan_conformance --test-threads=1
A=${ALLOCS:-100000} B=${BUFFERS:-8}
step repro-deferred-validated 240 .vkbin/inflight repro --backend vulkan \
  --policy deferred --allocations "$A" --buffers "$B" -q
step repro-deferred-novalidation 120 env INFLIGHT_VULKAN_VALIDATION=0 \
  .vkbin/inflight repro --backend vulkan --policy deferred --allocations "$A" --buffers "$B" -q
if [ "${IMMEDIATE:-0}" = 1 ]; then
  step repro-immediate 60 .vkbin/inflight repro --backend vulkan --policy immediate \
    --allocations 20000 -q
fi
(cd "$OUT" && grep -H -E "^vulkan:|^(submissions|buffers allocated|violations|corrupted|seconds|allocations/s) |test result|panicked" \
  ./*.log) >> "$S" 2>/dev/null
cat "$S"

#!/usr/bin/env bash
# Set up a machine for fasttrain: the system libraries FFCV compiles against, a virtualenv, PyTorch, and
# fasttrain itself with its dev extra. Idempotent: a second run checks, finds everything present, and exits.
#
#   bash launch/setup.sh                 # venv in ./.venv
#   FASTTRAIN_VENV=/opt/ft bash launch/setup.sh
#   FASTTRAIN_TORCH="torch==2.5.1 torchvision==0.20.1 --index-url https://download.pytorch.org/whl/cu124" bash launch/setup.sh
#
# Works on Debian/Ubuntu as root or with sudo. Any step that cannot be done stops the script with a message that
# names the missing piece.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FASTTRAIN_VENV:-$repo/.venv}"
python="${FASTTRAIN_PYTHON:-python3}"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# --- 1. system libraries for building ffcv (pkg-config, a C++ compiler, libturbojpeg, OpenCV core+imgproc) ---
have_system_libs() {
    command -v pkg-config >/dev/null && command -v g++ >/dev/null \
        && [ -f /usr/include/turbojpeg.h ] \
        && [ -f /usr/include/opencv4/opencv2/core.hpp ] && [ -f /usr/include/opencv4/opencv2/imgproc.hpp ]
}
if have_system_libs; then
    say "system libraries present"
else
    packages=(pkg-config g++ libturbojpeg0-dev libopencv-core-dev libopencv-imgproc-dev)
    command -v apt-get >/dev/null || die "apt-get not found: install ${packages[*]} (or your distribution's equivalents) by hand, then rerun"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || die "not root and no sudo: as root run 'apt-get install ${packages[*]}', then rerun"
        sudo="sudo"
    fi
    say "installing ${packages[*]} with apt-get"
    $sudo apt-get update -qq || die "apt-get update failed (network? apt sources?)"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" \
        || die "apt-get could not install: ${packages[*]}"
    have_system_libs || die "after apt-get, still missing one of: pkg-config, g++, /usr/include/turbojpeg.h, OpenCV 4 core/imgproc headers"
fi

# Debian ships opencv4.pc only in the 660 MB libopencv-dev, whose opencv.hpp pulls in every module. ffcv needs only
# core and imgproc, so give pkg-config a private opencv4.pc and an opencv.hpp that includes just those two.
pcdir="$venv/fasttrain-pkgconfig"
if ! pkg-config --exists opencv4 2>/dev/null; then
    mkdir -p "$pcdir/include/opencv2"
    cat >"$pcdir/include/opencv2/opencv.hpp" <<'EOF'
#include <opencv2/core.hpp>
#include <opencv2/imgproc.hpp>
EOF
    libdir="$(dirname "$(ls /usr/lib/*/libopencv_core.so /usr/lib/libopencv_core.so 2>/dev/null | head -n1)")"
    [ -n "$libdir" ] && [ "$libdir" != "." ] || die "libopencv_core.so not found: install libopencv-core-dev"
    cat >"$pcdir/opencv4.pc" <<EOF
Name: opencv4
Description: OpenCV core+imgproc for building ffcv
Version: 4
Libs: -L$libdir -lopencv_imgproc -lopencv_core
Cflags: -I$pcdir/include -I/usr/include/opencv4
EOF
    export PKG_CONFIG_PATH="$pcdir${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
fi
pkg-config --exists libturbojpeg || die "pkg-config cannot find libturbojpeg: install libturbojpeg0-dev"

# --- 2. virtualenv ---
if [ ! -x "$venv/bin/python" ]; then
    command -v "$python" >/dev/null || die "$python not found: install Python >= 3.10 (apt-get install python3 python3-venv)"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || die "$python is older than 3.10"
    say "creating virtualenv $venv"
    "$python" -m venv "$venv" || die "could not create a virtualenv with $python (apt-get install python3-venv)"
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check)

# --- 3. PyTorch: keep the one installed; otherwise FASTTRAIN_TORCH, else the newest this pip may take ---
if "$py" -c 'import torch, torchvision' 2>/dev/null; then
    say "torch present: $("$py" -c 'import torch; print(torch.__version__)')"
else
    torch_spec="${FASTTRAIN_TORCH:-}"
    if [ -z "$torch_spec" ]; then
        # Some machines cap pip at the torch release they keep on disk (a pip constraint file). Asking for exactly
        # that release installs from disk; asking for a newer one fails.
        cap_file="$("${pip[@]}" config list 2>/dev/null | sed -n "s/^.*constraint='\(.*\)'$/\1/p" | head -n1)"
        if [ -n "$cap_file" ] && [ -f "$cap_file" ]; then
            torch_cap="$(sed -n 's/^torch<=\([0-9.]*\)$/\1/p' "$cap_file")"
            vision_cap="$(sed -n 's/^torchvision<=\([0-9.]*\)$/\1/p' "$cap_file")"
            [ -n "$torch_cap" ] && [ -n "$vision_cap" ] && torch_spec="torch==$torch_cap torchvision==$vision_cap"
        fi
    fi
    torch_spec="${torch_spec:-torch torchvision}"
    say "installing $torch_spec"
    # shellcheck disable=SC2086  # the spec is a list of pip arguments
    "${pip[@]}" install -q $torch_spec || die "pip could not install '$torch_spec' (set FASTTRAIN_TORCH to a spec that works here)"
fi

# --- 4. fasttrain itself (and ffcv, wandb, accelerate...) with the dev extra ---
stamp="$venv/.fasttrain-installed"
want="$(cat "$repo/pyproject.toml" | sha256sum | cut -d' ' -f1) $repo"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
        && "$py" -c 'import fasttrain, ffcv, accelerate, wandb, wandb_workspaces, pytest' 2>/dev/null && [ -x "$venv/bin/ruff" ]; then
    say "fasttrain installed and up to date in $venv"
else
    say "installing fasttrain[dev] (builds ffcv from source; about a minute)"
    "${pip[@]}" install -q -e "$repo[dev]" || die "pip install -e '$repo[dev]' failed; if ffcv failed to build, check the system libraries above"
    "$py" -c 'import fasttrain, ffcv, accelerate, wandb' || die "fasttrain installed but an import fails (see above)"
    echo "$want" >"$stamp"
fi
say "ready: $("$py" -c 'import torch, ffcv, accelerate, wandb, fasttrain; print(f"fasttrain {fasttrain.__version__}, torch {torch.__version__}, accelerate {accelerate.__version__}, wandb {wandb.__version__}")')"

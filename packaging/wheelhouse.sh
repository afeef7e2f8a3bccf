#!/bin/sh
# Download and build every wheel the packages install, once for both packages:
#
#   packaging/wheelhouse.sh SRCDIR OUTDIR
#
# OUTDIR/tools: a build-only virtualenv (its pip builds and installs; never shipped).
# OUTDIR/wheels: authd's wheel, built from SRCDIR, and its dependencies' wheels from PyPI
# (binary wheels only: no compiler, no sdist code run), pinned by packaging/constraints.txt
# where it names them. This is the only step that uses the network.
set -eu

src=$(cd "$1" && pwd)
out=$2
python=${AUTHD_PYTHON:-/usr/bin/python3.11}

mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ ! -x "$out/tools/bin/pip" ]; then
    "$python" -m venv "$out/tools"
fi
rm -rf "$out/wheels"
"$out/tools/bin/pip" wheel --quiet --disable-pip-version-check --wheel-dir "$out/wheels" \
    --only-binary=:all: --constraint "$src/packaging/constraints.txt" "$src"
ls "$out/wheels"

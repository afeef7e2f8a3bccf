#!/bin/sh
# Build authd's self-contained virtualenv into a package's staging tree, from wheels only:
#
#   packaging/build-venv.sh WHEELHOUSE DESTDIR [PREFIX]
#
# makes DESTDIR/PREFIX (PREFIX: /opt/authd) a virtualenv on the distribution's
# /usr/bin/python3.11 with authd and its dependencies installed from WHEELHOUSE (see
# packaging/wheelhouse.sh; no index is consulted here), then rewrites what would point into
# the staging tree (script shebangs, pyvenv.cfg, activate scripts) to PREFIX and
# byte-compiles everything with PREFIX as the embedded source path. Nothing runs at install
# time: the package ships the .pyc files.
set -eu

wheels=$(cd "$1" && pwd)
destdir=$2
prefix=${3:-/opt/authd}
python=${AUTHD_PYTHON:-/usr/bin/python3.11}
tools=${AUTHD_TOOLS_VENV:-$wheels/../tools}

umask 022
mkdir -p "$destdir"
destdir=$(cd "$destdir" && pwd)
target=$destdir$prefix
rm -rf "$target"
mkdir -p "$(dirname "$target")"
# No pip, setuptools or wheel in the shipped venv: nothing is installed into it later.
"$python" -m venv --without-pip "$target"
# Installed by the build tools' pip into the target interpreter (pip --python).
"$tools/bin/pip" --python "$target/bin/python" install --quiet --disable-pip-version-check \
    --no-index --find-links "$wheels" --no-compile --no-warn-script-location \
    --only-binary=:all: authd

# Paths into the staging tree -> PREFIX.
for f in "$target"/bin/*; do
    [ -f "$f" ] && [ ! -L "$f" ] || continue
    if head -c 2 "$f" | grep -q '^#!'; then
        sed -i "1s|^#!$target/bin/|#!$prefix/bin/|" "$f"
    fi
    grep -Iq . "$f" && sed -i "s|$target|$prefix|g" "$f"
done
sed -i "s|$target|$prefix|g" "$target/pyvenv.cfg"
# Executable bits without a shebang (a test file in certifi's wheel) mean nothing.
find "$target/lib" -type f -name '*.py' -perm /111 -exec chmod a-x {} +
# The local wheel's file:// URL (the build machine's path) says nothing useful.
find "$target/lib" -path '*.dist-info/direct_url.json' -delete
if grep -rIl --exclude='*.pyc' "$target" "$target" >/dev/null 2>&1; then
    echo "build-venv: files still name the staging path $target:" >&2
    grep -rIl --exclude='*.pyc' "$target" "$target" >&2
    exit 1
fi

# Byte-compile with the final path embedded (tracebacks name /opt/authd/...). Hash-based
# .pyc files do not depend on file times, which packaging tools rewrite (rpm clamps them).
"$target/bin/python" -m compileall -q -j 0 -s "$destdir" -p / \
    --invalidation-mode unchecked-hash "$target/lib"

# Smoke test in place: the interpreter finds the venv, and the compiled parts load.
"$target/bin/python" -c '
import sys, authd.cli, cryptography.hazmat.bindings._rust, uvloop, httptools, jwt, falcon
assert sys.prefix.endswith("'"$prefix"'"), sys.prefix
print("build-venv: authd", authd.__version__, "on Python", sys.version.split()[0])
'

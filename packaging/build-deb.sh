#!/usr/bin/env bash
# Builds packaging/out/kktd_<version>_<arch>.deb with dpkg-deb (no debhelper):
#   /opt/kktd/venv                     a venv from Debian's /usr/bin/python3 with kktd installed
#                                      non-editable, pinned by constraints.txt
#   /usr/bin/kktd                      -> /opt/kktd/venv/bin/kktd
#   /lib/systemd/system/kktd.service   systemd/kktd.service, byte for byte
#   /usr/lib/sysusers.d/kktd.conf      systemd/kktd.sysusers
#   /etc/kktd/kktd.toml                systemd/kktd.toml (conffile, every key commented with its default)
# No tmpfiles.d entry: StateDirectory= creates /var/lib/kktd (0700, kktd) when the service starts.
#
# Usage: packaging/build-deb.sh [OUT_DIR]      (default OUT_DIR: packaging/out)
# A venv is not relocatable, so it is built in a staging tree and its absolute paths are rewritten to
# /opt/kktd/venv; the build fails if any staging path is left in the package.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
out_dir="$(mkdir -p "${1:-$here/out}" && cd "${1:-$here/out}" && pwd)"
# Debian's interpreter, resolved to its versioned binary: the venv must keep using the python3.X its
# site-packages were built for even if /usr/bin/python3 later points at another version.
python="$(realpath "${PYTHON:-/usr/bin/python3}")"
prefix=/opt/kktd/venv

for tool in dpkg-deb dpkg "$python"; do
    command -v "$tool" >/dev/null || { echo "build-deb: $tool not found" >&2; exit 1; }
done

version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$repo/kktd/__init__.py")"
[ -n "$version" ] || { echo "build-deb: no __version__ in kktd/__init__.py" >&2; exit 1; }
arch="$(dpkg --print-architecture)"
py_version="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"

work="$(mktemp -d "${TMPDIR:-/tmp}/kktd-deb-XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"
stage_venv="$root$prefix"

echo "build-deb: kktd $version for $arch (python $py_version) in $work"
"$python" -m venv "$stage_venv"
# The wheel is built from a copy, so the build leaves nothing (build/, *.egg-info) in the checkout.
mkdir "$work/src"
cp -a "$repo/kktd" "$repo/setup.cfg" "$repo/pyproject.toml" "$work/src/"
[ -f "$repo/README.md" ] && cp "$repo/README.md" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
"$stage_venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile \
    -c "$repo/constraints.txt" "$work/src"

# The service never installs anything at run time: ship no pip/setuptools (less code, less to patch).
"$stage_venv/bin/python" -m pip uninstall --quiet --yes pip setuptools
# direct_url.json only records the build's temporary source path: drop it (and its RECORD line).
for direct_url in "$stage_venv"/lib/python*/site-packages/kktd-*.dist-info/direct_url.json; do
    [ -e "$direct_url" ] || continue
    rm "$direct_url"
    sed -i '/\/direct_url.json,/d' "$(dirname "$direct_url")/RECORD"
done
# Rewrite the staging prefix: script shebangs, activate scripts and pyvenv.cfg.
grep -rlI --null -- "$stage_venv" "$stage_venv/bin" "$stage_venv/pyvenv.cfg" \
    | xargs -0 --no-run-if-empty sed -i "s|$stage_venv|$prefix|g"
# Byte-compile now with the final paths: the service cannot write __pycache__ (ProtectSystem=strict).
# Caches written during venv creation carry the staging path in their code objects: recompile all.
find "$stage_venv" -name __pycache__ -prune -exec rm -rf {} +
"$stage_venv/bin/python" -m compileall -q -j 0 -s "$root" -p / "$stage_venv/lib" >/dev/null
if leftovers="$(grep -rl -- "$work" "$root")" && [ -n "$leftovers" ]; then
    echo "build-deb: staging paths left in: $leftovers" >&2
    exit 1
fi

install -D -m 0644 "$repo/systemd/kktd.service" "$root/lib/systemd/system/kktd.service"
install -D -m 0644 "$repo/systemd/kktd.sysusers" "$root/usr/lib/sysusers.d/kktd.conf"
install -D -m 0644 "$repo/systemd/kktd.toml" "$root/etc/kktd/kktd.toml"
mkdir -p "$root/usr/bin"
ln -s "$prefix/bin/kktd" "$root/usr/bin/kktd"

mkdir -p "$root/DEBIAN"
installed_size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
cat > "$root/DEBIAN/control" <<EOF
Package: kktd
Version: $version
Architecture: $arch
Maintainer: kktd maintainers <kktd@localhost>
Installed-Size: $installed_size
Depends: python$py_version, systemd (>= 247)
Section: misc
Priority: optional
Description: fiscal receipt buffering daemon for POS terminals
 kktd accepts receipts from the POS over local HTTP, stores them durably in SQLite before answering,
 and forwards them to the OFD (fiscal data operator), retrying until each one is acknowledged.
EOF
echo /etc/kktd/kktd.toml > "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "$here/maintainer/$script" "$root/DEBIAN/$script"
done

deb="$out_dir/kktd_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "build-deb: $deb ($(du -h "$deb" | cut -f1))"

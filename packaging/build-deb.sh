#!/usr/bin/env bash
# Builds the kktd Debian package with dpkg-buildpackage from packaging/debian/ (debhelper, see
# packaging/debian/rules). The source package is laid out in a scratch directory: the project's files (as
# git sees them: tracked and untracked-but-not-ignored, so new modules need no edit here) at its top and
# packaging/debian/ as its debian/, so the build leaves nothing (build/, *.egg-info, debian/kktd) in the
# checkout.
#
# Usage:
#   packaging/build-deb.sh [OUT_DIR]        stage and build; the .deb goes to OUT_DIR (packaging/out)
#   packaging/build-deb.sh stage SRC_DIR    only lay out the source package in SRC_DIR (must not exist)
#   packaging/build-deb.sh build SRC_DIR OUT_DIR
#                                           build a laid-out (possibly edited) source package
# The second and third forms let tests build another version of the same code (an edited
# debian/changelog) the way a maintainer prepares an upload.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

die() { echo "build-deb: $*" >&2; exit 1; }

stage() {
    local src="$1"
    [ ! -e "$src" ] || die "$src exists already"
    mkdir -p "$src"
    if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # -z: names with any byte; deleted-but-not-committed files are skipped by the existence test.
        git -C "$repo" ls-files -z --cached --others --exclude-standard \
            | (cd "$repo" && while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done) \
            | (cd "$repo" && tar --null --no-recursion -cf - --files-from=-) \
            | tar -xf - -C "$src"
    else
        tar -C "$repo" --exclude=.venv --exclude=state --exclude=packaging/out --exclude=__pycache__ \
            --exclude=packaging/debian -cf - . | tar -xf - -C "$src"
    fi
    cp -a "$here/debian" "$src/debian"
}

build() {
    local src="$1" out="$2"
    mkdir -p "$out"
    out="$(cd "$out" && pwd)"
    command -v dpkg-buildpackage >/dev/null || die "dpkg-buildpackage not found (apt-get install dpkg-dev debhelper)"
    # dpkg-buildpackage writes its results beside the source directory.
    # The log goes beside the .deb: the scratch directory of a plain `make deb` is removed on exit.
    local log="$out/build.log"
    (cd "$src" && dpkg-buildpackage -us -uc -b) >"$log" 2>&1 \
        || { tail -n 60 "$log" >&2; die "dpkg-buildpackage failed; full log: $log"; }
    local parent name version arch deb
    parent="$(dirname "$src")"
    name="$(cd "$src" && dpkg-parsechangelog -S Source)"
    version="$(cd "$src" && dpkg-parsechangelog -S Version)"
    arch="$(dpkg-architecture -qDEB_HOST_ARCH)"
    deb="${name}_${version#*:}_${arch}.deb"
    [ -f "$parent/$deb" ] || die "dpkg-buildpackage did not produce $deb"
    cp "$parent/$deb" "$parent/${name}_${version#*:}_${arch}.buildinfo" "$out/"
    echo "build-deb: $out/$deb ($(du -h "$out/$deb" | cut -f1))"
}

case "${1:-}" in
    stage)
        [ $# = 2 ] || die "usage: $0 stage SRC_DIR"
        stage "$2"
        ;;
    build)
        [ $# = 3 ] || die "usage: $0 build SRC_DIR OUT_DIR"
        build "$2" "$3"
        ;;
    *)
        [ $# -le 1 ] || die "usage: $0 [OUT_DIR]"
        out="${1:-$here/out}"
        work="$(mktemp -d "${TMPDIR:-/tmp}/kktd-deb-XXXXXX")"
        trap 'rm -rf "$work"' EXIT
        stage "$work/kktd"
        build "$work/kktd" "$out"
        ;;
esac

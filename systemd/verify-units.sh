#!/usr/bin/env bash
# Static checks of the shipped systemd files (run by `make verify-units` and `make test`):
#  1. `systemd-analyze verify` on systemd/kktd.service as shipped: any output at all is a failure, since
#     systemd reports most unit problems as warnings with exit status 0.
#  2. `systemd-analyze security --offline=yes`: the exposure level must stay at or below $THRESHOLD.
#  3. `systemd-sysusers --dry-run` on kktd.sysusers against an empty root (syntax and resolvability).
# The shipped ExecStart (/usr/lib/kktd/venv/bin/kktd, from the Debian package) normally does not exist on a
# build host, and verify rejects a missing binary; instead of editing a copy, the unit file itself is
# verified inside a private mount namespace where an overlay (its upper layer on a tmpfs) over /usr/lib
# carries a stand-in executable. The host's /usr/lib is untouched.
set -euo pipefail

THRESHOLD="${KKTD_EXPOSURE_THRESHOLD:-1.5}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
unit="$here/kktd.service"
sysusers="$here/kktd.sysusers"

if [ "$(id -u)" != 0 ]; then
    echo "verify-units: must run as root (it verifies the unit in a private mount namespace)" >&2
    exit 1
fi
for tool in systemd-analyze systemd-sysusers unshare; do
    command -v "$tool" >/dev/null || { echo "verify-units: $tool not found (apt-get install systemd util-linux)" >&2; exit 1; }
done

exec_start="$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$unit")"
case "$exec_start" in
    /usr/lib/*) ;;
    *) echo "verify-units: ExecStart '$exec_start' is not under /usr/lib; update this script" >&2; exit 1 ;;
esac

layers="$(mktemp -d)"
verify_out="$(unshare --mount --propagation private -- sh -euc '
    if [ ! -x "$1" ]; then
        mount -t tmpfs -o mode=0755,size=1m verify-units "$3"
        mkdir -p "$3/upper" "$3/work"
        mount -t overlay -o "lowerdir=/usr/lib,upperdir=$3/upper,workdir=$3/work" verify-units /usr/lib
        mkdir -p "$(dirname "$1")"
        printf "#!/bin/sh\nexit 0\n" > "$1"
        chmod 0755 "$1"
    fi
    systemd-analyze verify "$2" 2>&1
' verify-units "$exec_start" "$unit" "$layers")" && rc=0 || rc=$?
rmdir "$layers"
[ "$rc" = 0 ] || { echo "$verify_out" >&2; echo "verify-units: systemd-analyze verify failed" >&2; exit 1; }
if [ -n "$verify_out" ]; then
    echo "$verify_out" >&2
    echo "verify-units: systemd-analyze verify printed warnings (treated as errors)" >&2
    exit 1
fi
echo "verify-units: systemd-analyze verify kktd.service: clean"

# The security review only reads the unit file, so no stand-in binary is needed here. systemd 252 takes
# --threshold in tenths of the printed exposure level (an integer 0..100), hence the conversion.
threshold_tenths="$(awk -v t="$THRESHOLD" 'BEGIN { if (t !~ /^[0-9]+(\.[0-9])?$/) exit 1; printf "%d", t * 10 + 0.5 }')" \
    || { echo "verify-units: KKTD_EXPOSURE_THRESHOLD must look like 1.5, got '$THRESHOLD'" >&2; exit 1; }
security_out="$(systemd-analyze security --offline=yes --no-pager --threshold="$threshold_tenths" "$unit" 2>&1)" \
    && rc=0 || rc=$?
exposure="$(printf '%s\n' "$security_out" | sed -n 's/.*Overall exposure level for kktd.service: \([0-9.]*\) \([A-Z]*\).*/\1 \2/p')"
if [ "$rc" != 0 ] || [ -z "$exposure" ]; then
    printf '%s\n' "$security_out" | grep -v '^  ✓' >&2 || true
    echo "verify-units: exposure '${exposure:-unknown}' is above threshold $THRESHOLD (rc=$rc)" >&2
    exit 1
fi
echo "verify-units: systemd-analyze security kktd.service: exposure $exposure (threshold $THRESHOLD)"

empty_root="$(mktemp -d)"
trap 'rm -rf "$empty_root"' EXIT
if ! sysusers_out="$(systemd-sysusers --root="$empty_root" --dry-run "$sysusers" 2>&1)" \
        || printf '%s\n' "$sysusers_out" | grep -qiE 'ignoring|unknown|failed|invalid'; then
    echo "$sysusers_out" >&2
    echo "verify-units: systemd-sysusers rejected kktd.sysusers" >&2
    exit 1
fi
echo "verify-units: systemd-sysusers --dry-run kktd.sysusers: clean"

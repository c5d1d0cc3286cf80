#!/bin/bash
# Builds the DIR that `tests/tools/bench.py --originals DIR` times: the shell
# original vif-route-qubes of one Qubes release with what it sources, taken
# from local git clones of qubes-core-agent-linux and xen (nothing is kept in
# this repository).  Usage:
#   tests/tools/make_originals.sh r4.0|r4.2 QUBES_GIT XEN_GIT DIR
# r4.0 is R4.0's iptables script (bench --backend iptables), r4.2 R4.2's
# nftables one (--backend nft).
set -euo pipefail

usage() { echo "usage: $0 r4.0|r4.2 QUBES_GIT XEN_GIT DIR" >&2; exit 2; }
[[ $# -eq 4 ]] || usage
release=$1 qubes=$2 xen=$3 dir=$4
case "$release" in
    r4.0) qubes_tag=v4.0.65 xen_tag=RELEASE-4.8.5 ;;
    r4.2) qubes_tag=v4.2.47 xen_tag=RELEASE-4.17.7 ;;
    *) usage ;;
esac

mkdir -p "$dir/log"
dir=$(cd "$dir" && pwd)
show() { git -C "$1" show "$2:$3"; }

show "$qubes" "$qubes_tag" network/vif-route-qubes >"$dir/vif-route-qubes"
show "$qubes" "$qubes_tag" network/vif-qubes-nat.sh >"$dir/vif-qubes-nat.sh"
chmod +x "$dir/vif-route-qubes"
if [[ $release == r4.2 ]]; then
    # The flowtable block fails on a kernel without flowtables; ours sets none
    # up, so the comparison leaves it out: drop from its `if` to its `fi`.
    sed -i '/if \[\[ -n "\$separator" \]\]; then/,/^        fi$/d' "$dir/vif-route-qubes"
    ! grep -q qubes-nat-accel "$dir/vif-route-qubes" || { echo "$0: flowtable block not removed" >&2; exit 1; }
fi

hotplug=tools/hotplug/Linux
for f in vif-common.sh xen-network-common.sh xen-script-common.sh locking.sh logging.sh; do
    show "$xen" "$xen_tag" "$hotplug/$f" >"$dir/$f"
done
show "$xen" "$xen_tag" "$hotplug/xen-hotplug-common.sh.in" |
    sed -e "s|@XEN_LOG_DIR@|$dir/log|g" -e "s|@XEN_SCRIPT_DIR@|$dir|g" >"$dir/xen-hotplug-common.sh"
cat >"$dir/hotplugpath.sh" <<EOF
sbindir="/usr/sbin"
bindir="/usr/bin"
LIBEXEC_BIN="/usr/libexec/xen/bin"
libdir="/usr/lib/x86_64-linux-gnu"
XEN_SCRIPT_DIR="$dir"
XEN_LOG_DIR="$dir/log"
EOF
echo "$0: $dir holds $release's original ($qubes_tag, xen $xen_tag)"

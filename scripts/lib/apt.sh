#!/usr/bin/env bash
# Sourced by scripts/setup, scripts/test-package and scripts/test-rdma:
#
#   rdmax_apt_ensure LOG PKG...   install the PKGs not installed yet, as root,
#                                 without recommends; apt's and dpkg's output
#                                 (hundreds of "Reading database" lines) goes
#                                 to LOG, one line here, LOG's tail on failure.
#                                 Returns 1 with 'rdma-x: error: ...' when not
#                                 root or when apt fails; 0 when nothing was
#                                 missing or all installed.
rdmax_apt_ensure() {
    local log=$1 p
    local missing=()
    shift
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' ||
            missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "rdma-x: error: missing Debian packages (run as root to install): ${missing[*]}" >&2
        return 1
    fi
    echo "rdma-x: installing ${#missing[@]} packages: ${missing[*]} (log: $log)" >&2
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        echo "rdma-x: error: package install failed, see $log" >&2
        return 1
    fi
}

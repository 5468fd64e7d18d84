#!/usr/bin/env bash
# Unpack a Debian package's files into a folder (dpkg -x: nothing installed system-wide, no service
# started), unless CHECK (a glob under DEST) already exists. The package lists are refreshed only when
# they lack the package.
#   scripts/unpack-deb.sh PACKAGE DEST CHECK
set -euo pipefail
package=${1:?usage: $0 PACKAGE DEST CHECK}
dest=${2:?usage: $0 PACKAGE DEST CHECK}
check=${3:?usage: $0 PACKAGE DEST CHECK}
# shellcheck disable=SC2086  # CHECK is a glob
if ls $dest/$check >/dev/null 2>&1; then
    exit 0
fi
debs=$(mktemp -d)
trap 'rm -rf "$debs"' EXIT
get() { (cd "$debs" && apt-get download -q -o APT::Sandbox::User=root "$package"); }
get || { apt-get update -q && get; } || {
    echo "could not download Debian's $package (apt-get download); $dest/$check is needed" >&2
    exit 1
}
mkdir -p "$dest"
dpkg -x "$debs"/"${package}"_*.deb "$dest"
ls $dest/$check >/dev/null

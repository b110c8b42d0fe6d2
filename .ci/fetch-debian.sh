#!/usr/bin/env bash
# Fetches one package of another Debian suite, with the libraries it links against, into a
# directory of the project, without touching this machine's apt sources:
#
#   .ci/fetch-debian.sh [--as-is] SUITE[/FROM] PACKAGE BINARY DEST
#
# SUITE's package lists go to DEST/apt (a private apt state); PACKAGE and the closure of its lib*
# dependencies are unpacked under DEST/root; BINARY (a path inside the package) is copied to
# DEST/BINARY's basename and pointed at the suite's own loader and libraries with patchelf, so
# that it runs here and can re-execute itself (HAProxy's master-worker reload does).
# SUITE/FROM takes PACKAGE from suite FROM and its libraries from SUITE: sid/experimental.
# --as-is leaves BINARY alone, for an older suite whose binary runs on this machine's libc
# (patchelf breaks Go binaries such as consul).
set -euo pipefail
patch=yes
[ "$1" = --as-is ] && { patch=no; shift; }
suite=${1%%/*} from=${1#*/} package=$2 binary=$3 dest=$(realpath -m "$4")
[ "$from" = "$1" ] && from=$suite

archive=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
          sed -n 's/^URIs: *\(http[^ ]*debian\)\/*$/\1/p; s/^deb \(\[[^]]*\] \)\?\(http[^ ]*debian\)\/* .*/\2/p' |
          head -n 1) || true
[ -n "$archive" ] || { echo "fetch-debian: no Debian archive in this machine's apt sources" >&2; exit 1; }

mkdir -p "$dest/apt/lists/partial" "$dest/apt/cache/archives/partial" "$dest/debs"
{
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $archive $suite main"
    [ "$from" = "$suite" ] || echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $archive $from main"
} > "$dest/apt/sources.list"
apt_private=(-o "Dir::Etc::SourceList=$dest/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o "Dir::State::Lists=$dest/apt/lists" -o "Dir::Cache=$dest/apt/cache"
             -o Dir::State::Status=/dev/null -o APT::Get::List-Cleanup=false)
apt-get "${apt_private[@]}" -qq update

version=$(apt-cache "${apt_private[@]}" madison "$package" | awk -v s="$from" '$0 ~ s {print $3; exit}')
[ -n "$version" ] || { echo "fetch-debian: no $package in $from" >&2; exit 1; }

# The lib* closure of PACKAGE's dependencies: what its binary needs at run time.
lib_dependencies() {
    apt-cache "${apt_private[@]}" depends --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances "$1" |
        sed -n 's/^ *\(Pre\)\?Depends: \(lib[^ <>]*\|zlib1g\)$/\2/p' | tr '\n' ' '
}
wanted=() queue=
[ "$patch" = yes ] && queue=$(lib_dependencies "$package=$version")
while [ -n "$queue" ]; do
    read -r name queue <<< "$queue"
    case " ${wanted[*]} " in *" $name "*) continue ;; esac
    wanted+=("$name")
    queue="$queue $(lib_dependencies "$name")"
done

# _apt cannot write into the project: the download runs as the caller, which apt warns about.
(cd "$dest/debs" && rm -f ./*.deb && apt-get -o APT::Sandbox::User=root "${apt_private[@]}" -qq download "$package=$version" "${wanted[@]}")
rm -rf "$dest/root"
for deb in "$dest"/debs/*.deb; do dpkg-deb -x "$deb" "$dest/root"; done

target="$dest/$(basename "$binary")"
cp "$dest/root/$binary" "$target.new"
if [ "$patch" = yes ]; then
    loader=$(find "$dest/root" -type f \( -name 'ld-linux*.so*' -o -name 'ld-[0-9]*.so' \) | head -n 1)
    [ -n "$loader" ] || { echo "fetch-debian: no dynamic loader among $suite's libraries" >&2; exit 1; }
    library_path=$(find "$dest/root" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)
    # DT_RPATH (--force-rpath), unlike DT_RUNPATH, also serves the libraries' own dependencies.
    patchelf --set-interpreter "$loader" --force-rpath --set-rpath "$library_path" "$target.new"
fi
mv "$target.new" "$target"
echo "$version" > "$dest/version"

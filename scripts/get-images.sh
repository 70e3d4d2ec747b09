#!/usr/bin/env bash
# Real colour images for the tests of the image-folder path: the 3,786 64x64 Twemoji PNGs of the npm package
# emoji-datasource-twitter (PNG modes RGBA, LA and P mixed, as real folders are). Fetched once with npm and kept
# outside the repository; prints nothing when the folder is already there.
set -euo pipefail
version=16.0.0
dest="${VAELAB_TEST_IMAGES:-${XDG_CACHE_HOME:-$HOME/.cache}/vaelab-test-images}"
target="$dest/twemoji-64"
if [ -f "$target/.complete" ]; then exit 0; fi
if ! command -v npm >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's npm (to fetch the test images) ..."
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
fi
command -v npm >/dev/null || { echo "get-images.sh: npm is needed to fetch the test images (apt-get install npm)" >&2; exit 1; }
mkdir -p "$dest"
work="$(mktemp -d "$dest/.fetch-XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "fetching emoji-datasource-twitter@$version (real 64x64 colour PNGs for the tests) into $target ..."
(cd "$work" && npm pack --silent "emoji-datasource-twitter@$version" >/dev/null)
tar -xzf "$work"/emoji-datasource-twitter-$version.tgz -C "$work" package/img/twitter/64
touch "$work/package/img/twitter/64/.complete"
rm -rf "$target"
mv "$work/package/img/twitter/64" "$target"

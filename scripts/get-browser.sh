#!/usr/bin/env bash
# The report test opens report.html in a real headless browser. Use one that is installed (or $VAELAB_BROWSER);
# otherwise install Debian's chromium when we can (root + apt), as CI runs.
set -euo pipefail
if [ -n "${VAELAB_BROWSER:-}" ] && command -v "$VAELAB_BROWSER" >/dev/null; then exit 0; fi
for b in chromium chromium-browser google-chrome; do
  if command -v "$b" >/dev/null; then exit 0; fi
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium (a headless browser for the report test) ..."
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  command -v chromium >/dev/null && exit 0
fi
echo "no headless browser found: install chromium (apt-get install chromium) or set VAELAB_BROWSER" >&2
exit 1

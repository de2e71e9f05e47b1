#!/usr/bin/env bash
# Re-fetch the browser terminal's xterm.js files from the npm registry (pinned versions, integrity
# checked by npm) into gateway/static/vendor/. The result is committed: the gateway never uses a CDN.
set -euo pipefail
cd "$(dirname "$0")/.."

XTERM_VERSION=6.0.0
FIT_VERSION=0.11.0
dest=gateway/static/vendor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "@xterm/xterm@${XTERM_VERSION}" "@xterm/addon-fit@${FIT_VERSION}" >/dev/null)
mkdir -p "$work/xterm" "$work/fit"
tar -xzf "$work/xterm-xterm-${XTERM_VERSION}.tgz" -C "$work/xterm"
tar -xzf "$work/xterm-addon-fit-${FIT_VERSION}.tgz" -C "$work/fit"

rm -rf "$dest"
mkdir -p "$dest/xterm" "$dest/addon-fit"
cp "$work/xterm/package/lib/xterm.js" "$work/xterm/package/css/xterm.css" \
   "$work/xterm/package/LICENSE" "$dest/xterm/"
cp "$work/fit/package/lib/addon-fit.js" "$work/fit/package/LICENSE" "$dest/addon-fit/"
cat > "$dest/VERSIONS" <<VERSIONS
@xterm/xterm ${XTERM_VERSION}
@xterm/addon-fit ${FIT_VERSION}
VERSIONS
echo "vendored @xterm/xterm ${XTERM_VERSION} and @xterm/addon-fit ${FIT_VERSION} into $dest"

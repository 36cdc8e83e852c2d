#!/usr/bin/env bash
# Vendors uPlot (the Traffic page's charts) from the npm registry into static/vendor/, pinned by
# version and integrity: the dashboard never loads anything from a CDN at run time. The result is
# committed; run this again only to move to another version (update VERSION and INTEGRITY).
set -euo pipefail
VERSION=1.6.32
INTEGRITY="sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGGzQm/ep3tOkyTxpiQIw=="
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/static/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "uplot@$VERSION" >/dev/null)
tgz="$work/uplot-$VERSION.tgz"
got="sha512-$(openssl dgst -sha512 -binary "$tgz" | base64 -w0)"
if [ "$got" != "$INTEGRITY" ]; then
  echo "uplot-$VERSION.tgz: integrity $got, expected $INTEGRITY" >&2
  exit 1
fi
tar -xzf "$tgz" -C "$work"
mkdir -p "$out"
cp "$work/package/dist/uPlot.iife.min.js" "$out/uPlot.iife.min.js"
cp "$work/package/dist/uPlot.min.css" "$out/uPlot.min.css"
cp "$work/package/LICENSE" "$out/uPlot.LICENSE"
echo "uPlot $VERSION -> $out"

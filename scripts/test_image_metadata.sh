#!/usr/bin/env bash
# What turbine's image files say about themselves (`--image-metadata`), read by ExifTool:
# scripts/image_metadata_check.py starts the real server on the tiny fixture model once per
# level (provenance, parameters, none), gets images every way a client can (base64, URL, WebP
# lossless and lossy, a stream, an inpainting edit, a LoRA adapter's) and checks each file with
# `exiftool -validate`: valid, and carrying IPTC's digital source type, the model's name and,
# with `parameters`, the prompts and the PNG `parameters` text; with `none`, nothing.
#
# ExifTool (Phil Harvey's, the reference reader of image metadata) comes from npm's
# `exiftool-vendored.pl` package, which ships its Perl sources; it needs `npm` and `perl`.
#
# Environment:
#   EXIFTOOL_VERSION   the exiftool-vendored.pl version (default: the one this was written with)
#   TURBINE_BIN        a prebuilt turbine binary (default: `cargo build`, target/debug/turbine)
# `--install-only` installs ExifTool and stops (.ci/run fetches it while cargo compiles).
set -euo pipefail
cd "$(dirname "$0")/.."
INSTALL_ONLY=0
[ "${1:-}" = "--install-only" ] && INSTALL_ONLY=1

VERSION=${EXIFTOOL_VERSION:-13.59.3}
DIR=target/exiftool
EXIFTOOL=$DIR/node_modules/exiftool-vendored.pl/bin/exiftool
command -v perl >/dev/null || { echo "ExifTool needs perl, which is not on PATH" >&2; exit 1; }
if [ "$(node -p "require('./$DIR/node_modules/exiftool-vendored.pl/package.json').version" 2>/dev/null)" != "$VERSION" ]; then
    echo "installing exiftool-vendored.pl@$VERSION into $DIR" >&2
    mkdir -p "$DIR"
    npm install --silent --no-audit --no-fund --prefix "$DIR" "exiftool-vendored.pl@$VERSION"
fi
echo "ExifTool $(perl "$EXIFTOOL" -ver)"
[ "$INSTALL_ONLY" = 0 ] || exit 0

if [ -z "${TURBINE_BIN:-}" ]; then
    cargo build --quiet --bin turbine
    TURBINE_BIN=target/debug/turbine
fi
python3 scripts/image_metadata_check.py --bin "$TURBINE_BIN" --exiftool "$EXIFTOOL"

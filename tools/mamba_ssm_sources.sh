#!/usr/bin/env bash
# Copy the parts of mamba-ssm that `kscan bench scan-gpu` compares against (its selective-scan
# CUDA sources and its Python package) from a git checkout or mirror into third_party/mamba,
# which git ignores: they are run beside kscan on a lent GPU machine, never committed.
# Usage: tools/mamba_ssm_sources.sh GIT_DIR [REV]   (e.g. the `fetch` tool's mirror of
# github:state-spaces/mamba); then name third_party/mamba in the device call's `carry`.
set -euo pipefail
src=${1:?usage: tools/mamba_ssm_sources.sh GIT_DIR [REV]}
rev=${2:-HEAD}
dest=third_party/mamba
rm -rf "$dest"
mkdir -p "$dest"
git --git-dir="$src" archive "$rev" csrc/selective_scan mamba_ssm LICENSE | tar -x -C "$dest"
git --git-dir="$src" rev-parse "$rev" >"$dest/REVISION"
echo "$dest: mamba-ssm $(cat "$dest/REVISION") ($(du -sh "$dest" | cut -f1))"

#!/usr/bin/env bash
# Print the paths of the two KHO/LUO test kernels (A on line 1, B on line 2), from the first
# source that has them:
#   1. MK_TEST_KERNEL_A / MK_TEST_KERNEL_B (prebuilt, any path)
#   2. ../shared/kernels beside the repository, if its SHA256SUMS verify
#   3. the local cache ${MK_KERNEL_CACHE:-/var/cache/mk-upgrade/kernels}/<src-ver>-<frag-hash>/
#   4. a build (kernel-patches/build-kernel.sh: Debian linux-source-* >= 6.19, ~7 min on 2 cores)
# Logs go to stderr.
set -euo pipefail
# shellcheck source=kernel-patches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
mk_find_env && exit 0
mk_find_shared && exit 0
mk_find_cache && exit 0
exec "$MK_KP_DIR/build-kernel.sh" --force

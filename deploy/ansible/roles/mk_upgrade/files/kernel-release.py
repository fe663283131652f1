#!/usr/bin/env python3
"""Prints the kernel release of an x86 bzImage: the first word of its `kernel_version` string.

Run on the controller by the mk_upgrade role to know which release a host must end up on
(the same field mk-upgrade reads: upgrade-agent/src/verify/bzimage.rs). Exit 1 with the
reason on stderr when the file is not a bzImage this can read.
"""
import struct
import sys

OFF_HDRS = 0x202
OFF_KERNEL_VERSION = 0x20E


def release(path):
    with open(path, "rb") as f:
        head = f.read(0x10000)
    if head[OFF_HDRS:OFF_HDRS + 4] != b"HdrS":
        raise ValueError("no 'HdrS' boot protocol header: not an x86 bzImage")
    (ptr,) = struct.unpack_from("<H", head, OFF_KERNEL_VERSION)
    if ptr == 0:
        raise ValueError("kernel_version is 0: the image does not say its release")
    start = 0x200 + ptr
    raw = head[start:start + 512].split(b"\0", 1)[0]
    words = raw.decode("ascii", "replace").split()
    if not words:
        raise ValueError(f"empty kernel_version string at offset {start:#x}")
    return words[0]


def main():
    if len(sys.argv) != 2:
        print("usage: kernel-release.py IMAGE", file=sys.stderr)
        return 2
    try:
        print(release(sys.argv[1]))
    except (OSError, ValueError, struct.error) as e:
        print(f"kernel-release.py: {sys.argv[1]}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

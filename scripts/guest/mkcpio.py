#!/usr/bin/env python3
"""Write a gzip-compressed cpio "newc" archive of a directory tree (the initramfs format the
Linux kernel unpacks, Documentation/driver-api/early-userspace/buffer-format.rst).
Usage: mkcpio.py SRCDIR OUT.gz   -- owner root, mtimes 0, sorted: same input, same bytes."""
import gzip
import os
import stat
import sys


def header(ino, mode, nlink, size, name):
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    data = head + name.encode() + b"\0"
    return data + b"\0" * (-len(data) % 4)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: mkcpio.py SRCDIR OUT.gz")
    src, out = sys.argv[1], sys.argv[2]
    entries = []
    for root, dirs, files in os.walk(src):
        dirs.sort()
        rel = os.path.relpath(root, src)
        if rel != ".":
            entries.append(rel)
        for f in sorted(files):
            entries.append(os.path.normpath(os.path.join(rel, f)))
    buf = bytearray()
    for ino, name in enumerate(entries, start=1):
        path = os.path.join(src, name)
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            body = os.readlink(path).encode()
        elif stat.S_ISREG(st.st_mode):
            with open(path, "rb") as fh:
                body = fh.read()
        else:
            body = b""
        nlink = 2 if stat.S_ISDIR(st.st_mode) else 1
        buf += header(ino, st.st_mode, nlink, len(body), name)
        buf += body + b"\0" * (-len(body) % 4)
    buf += header(0, 0, 1, 0, "TRAILER!!!")
    with open(out + ".tmp", "wb") as fh:
        fh.write(gzip.compress(bytes(buf), mtime=0))
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()

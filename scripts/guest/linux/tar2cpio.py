#!/usr/bin/env python3
"""Convert a root file system tarball (mmdebstrap's output) into an uncompressed cpio "newc"
archive, the initramfs format the kernel unpacks (Documentation/driver-api/early-userspace/
buffer-format.rst). Owners, modes, device numbers and symlinks are kept; a hard link becomes a
copy of its target's data (the kernel would link it, a copy is simpler and the guest is the same).
Usage: tar2cpio.py ROOTFS.tar OUT.cpio     -- mtimes 0: same tar, same bytes."""
import os
import stat
import sys
import tarfile


def header(ino, mode, uid, gid, nlink, size, rmaj, rmin, name):
    raw = name.encode("utf-8", "surrogateescape")  # the name's bytes, as in the tar
    fields = [ino, mode, uid, gid, nlink, 0, size, 0, 0, rmaj, rmin, len(raw) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields)
    data = head + raw + b"\0"
    return data + b"\0" * (-len(data) % 4)


def kind(m):
    if m.isdir():
        return stat.S_IFDIR
    if m.issym():
        return stat.S_IFLNK
    if m.ischr():
        return stat.S_IFCHR
    if m.isblk():
        return stat.S_IFBLK
    if m.isfifo():
        return stat.S_IFIFO
    return stat.S_IFREG  # regular files and hard links (written as copies)


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: tar2cpio.py ROOTFS.tar OUT.cpio")
    src, out = sys.argv[1], sys.argv[2]
    seen = set()
    with tarfile.open(src) as tar, open(out + ".tmp", "wb") as fh:
        ino = 0
        for m in tar:
            name = os.path.normpath(m.name.lstrip("/"))
            if name in (".", "") or name in seen:
                continue
            seen.add(name)
            ino += 1
            mode = kind(m) | (m.mode & 0o7777)
            body = b""
            if m.issym():
                body = m.linkname.encode("utf-8", "surrogateescape")
            elif m.isreg() or m.islnk():
                f = tar.extractfile(m)
                body = f.read() if f else b""
            nlink = 2 if m.isdir() else 1
            rmaj, rmin = (m.devmajor, m.devminor) if (m.ischr() or m.isblk()) else (0, 0)
            fh.write(header(ino, mode, m.uid, m.gid, nlink, len(body), rmaj, rmin, name))
            fh.write(body + b"\0" * (-len(body) % 4))
        fh.write(header(0, 0, 0, 0, 1, 0, 0, 0, "TRAILER!!!"))
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Open N iSCSI sessions to one target, log each in to full feature phase, then hold them idle.

Usage: idle_sessions.py HOST PORT TARGET_IQN N READY_FILE
Writes "ready N" to READY_FILE once every session is logged in, then keeps the connections
open (answering NOP-In pings, RFC 7143 §11.19) until SIGTERM/SIGINT. Exits 1 on a failed login.
Login: security stage (AuthMethod=None) then operational stage, T bit, NSG=3 (RFC 7143 §6.3,
§11.12). Each session has its own ISID and InitiatorName so no session is reinstated.
"""
import select
import signal
import socket
import struct
import sys

BHS = 48


def pad4(n):
    return (n + 3) & ~3


def keys(d):
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in d.items())


def login_pdu(isid, itt, csg, nsg, cmdsn, expstatsn, data):
    flags = 0x80 | (csg << 2) | nsg  # T=1
    hdr = bytearray(BHS)
    hdr[0] = 0x43  # immediate | Login Request
    hdr[1] = flags
    hdr[5:8] = len(data).to_bytes(3, "big")
    hdr[8:14] = isid
    struct.pack_into(">IHH", hdr, 16, itt, 0, 0)  # ITT, CID, reserved
    struct.pack_into(">II", hdr, 24, cmdsn, expstatsn)
    return bytes(hdr) + data + b"\0" * (pad4(len(data)) - len(data))


def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by target")
        buf += chunk
    return buf


def recv_pdu(s):
    hdr = recv_exact(s, BHS)
    ahs = hdr[4] * 4
    dlen = int.from_bytes(hdr[5:8], "big")
    rest = recv_exact(s, ahs + pad4(dlen))
    return hdr, rest[ahs:ahs + dlen]


class Session:
    def __init__(self, host, port, target, idx):
        self.s = socket.create_connection((host, port), timeout=10)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.isid = bytes([0x80, 0x00, 0x00, 0x42]) + idx.to_bytes(2, "big")
        self.iname = f"iqn.2026-11.io.ironlun:bench-idle-{idx}"
        self.target = target
        self.cmdsn = 1
        self.expstatsn = 0

    def step(self, csg, nsg, kv):
        self.s.sendall(login_pdu(self.isid, 1, csg, nsg, self.cmdsn, self.expstatsn, keys(kv)))
        hdr, data = recv_pdu(self.s)
        if hdr[0] & 0x3F != 0x23:
            raise RuntimeError(f"expected Login Response, got opcode {hdr[0] & 0x3f:#x}")
        if hdr[36] != 0:
            raise RuntimeError(f"login rejected: class {hdr[36]} detail {hdr[37]}")
        self.expstatsn = (struct.unpack_from(">I", hdr, 24)[0] + 1) & 0xFFFFFFFF
        return hdr[1], data

    def login(self):
        sec = {"InitiatorName": self.iname, "TargetName": self.target,
               "SessionType": "Normal", "AuthMethod": "None"}
        for _ in range(4):
            flags, _ = self.step(0, 1, sec)
            if flags & 0x80:
                break
            sec = {}
        else:
            raise RuntimeError("target never left the security stage")
        op = {"HeaderDigest": "None", "DataDigest": "None"}
        for _ in range(4):
            flags, _ = self.step(1, 3, op)
            if flags & 0x80 and flags & 0x03 == 3:
                self.s.settimeout(None)
                return
            op = {}
        raise RuntimeError("target never entered full feature phase")

    def on_readable(self):
        hdr, _ = recv_pdu(self.s)
        if hdr[0] & 0x3F == 0x20:  # NOP-In
            ttt = struct.unpack_from(">I", hdr, 20)[0]
            self.expstatsn = (struct.unpack_from(">I", hdr, 24)[0] + 1) & 0xFFFFFFFF
            if ttt != 0xFFFFFFFF:  # a ping that wants an answer
                out = bytearray(BHS)
                out[0] = 0x40  # immediate | NOP-Out
                out[1] = 0x80
                out[8:16] = hdr[8:16]  # LUN
                struct.pack_into(">IIII", out, 16, 0xFFFFFFFF, ttt, self.cmdsn, self.expstatsn)
                self.s.sendall(bytes(out))


def main():
    if len(sys.argv) != 6:
        sys.exit(__doc__)
    host, port, target, n, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sessions = []
    try:
        for i in range(n):
            s = Session(host, port, target, i)
            s.login()
            sessions.append(s)
    except (OSError, RuntimeError) as e:
        print(f"idle_sessions: session {len(sessions)}: {e}", file=sys.stderr)
        sys.exit(1)
    with open(ready, "w") as f:
        f.write(f"ready {len(sessions)}\n")
    by_fd = {s.s.fileno(): s for s in sessions}
    try:
        while by_fd:
            r, _, _ = select.select(list(by_fd), [], [], 60)
            for fd in r:
                try:
                    by_fd[fd].on_readable()
                except (OSError, ConnectionError):
                    print(f"idle_sessions: session on fd {fd} dropped", file=sys.stderr)
                    del by_fd[fd]
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

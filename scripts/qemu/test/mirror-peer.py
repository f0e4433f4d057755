#!/usr/bin/env python3
"""A minimal virtio-iommu vhost-user daemon speaking the mirror protocol.

Test peer for the QEMU side (scripts/qemu/patches): it serves the vhost-user socket (config
space, request queue, event queue) with a small in-memory virtio-iommu model and mirrors every
state change to QEMU as described in docs/mirror-protocol.md, including strict invalidation
(requests completed only after QEMU's ACK), FAULT -> event queue and SYSTEM_RESET.
It is not the project's daemon (backend/); single-threaded, split rings only, no EVENT_IDX.

    mirror-peer.py --socket-path /tmp/vu.sock --mirror-socket /tmp/vu-mirror.sock [--log FILE]
"""
import argparse
import array
import mmap
import os
import select
import signal
import socket
import struct
import sys

# ---------------------------------------------------------------------------------------------
# vhost-user
VHOST_USER_GET_FEATURES = 1
VHOST_USER_SET_FEATURES = 2
VHOST_USER_SET_OWNER = 3
VHOST_USER_RESET_OWNER = 4
VHOST_USER_SET_MEM_TABLE = 5
VHOST_USER_SET_VRING_NUM = 8
VHOST_USER_SET_VRING_ADDR = 9
VHOST_USER_SET_VRING_BASE = 10
VHOST_USER_GET_VRING_BASE = 11
VHOST_USER_SET_VRING_KICK = 12
VHOST_USER_SET_VRING_CALL = 13
VHOST_USER_SET_VRING_ERR = 14
VHOST_USER_GET_PROTOCOL_FEATURES = 15
VHOST_USER_SET_PROTOCOL_FEATURES = 16
VHOST_USER_GET_QUEUE_NUM = 17
VHOST_USER_SET_VRING_ENABLE = 18
VHOST_USER_GET_CONFIG = 24
VHOST_USER_SET_CONFIG = 25

F_REPLY = 0x4
F_NEED_REPLY = 0x8
PROTOCOL_F_MQ = 0
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_CONFIG = 9

VIRTIO_F_VERSION_1 = 32
VHOST_USER_F_PROTOCOL_FEATURES = 30
VIRTIO_IOMMU_F_INPUT_RANGE = 0
VIRTIO_IOMMU_F_DOMAIN_RANGE = 1
VIRTIO_IOMMU_F_MAP_UNMAP = 2
VIRTIO_IOMMU_F_PROBE = 4
VIRTIO_IOMMU_F_MMIO = 5
VIRTIO_IOMMU_F_BYPASS_CONFIG = 6

FEATURES = sum(1 << b for b in (VIRTIO_F_VERSION_1, VHOST_USER_F_PROTOCOL_FEATURES,
                                VIRTIO_IOMMU_F_INPUT_RANGE, VIRTIO_IOMMU_F_DOMAIN_RANGE,
                                VIRTIO_IOMMU_F_MAP_UNMAP, VIRTIO_IOMMU_F_PROBE,
                                VIRTIO_IOMMU_F_MMIO, VIRTIO_IOMMU_F_BYPASS_CONFIG))
PROTOCOL_FEATURES = (1 << PROTOCOL_F_CONFIG) | (1 << PROTOCOL_F_REPLY_ACK)

# virtio-iommu
S_OK, S_IOERR, S_UNSUPP, S_DEVERR, S_INVAL, S_RANGE, S_NOENT = 0, 1, 2, 3, 4, 5, 6
T_ATTACH, T_DETACH, T_MAP, T_UNMAP, T_PROBE = 1, 2, 3, 4, 5
PROBE_SIZE = 512
MSI_BASE, MSI_LAST = 0xfee00000, 0xfeefffff
U64_MAX = (1 << 64) - 1
BOOT_BYPASS = 1

# mirror protocol
MAGIC = 0x4d495556
HELLO, EVENTS, ACK, FAULT, SYSTEM_RESET = 1, 2, 3, 4, 5
F_SYNC = 1
R_ATTACH, R_DETACH, R_MAP, R_UNMAP, R_GLOBAL_BYPASS, R_RESET = 1, 2, 3, 4, 5, 6
MAX_RECORDS = (65536 - 16) // 40

LOG = sys.stderr


def log(*a):
    print("mirror-peer:", *a, file=LOG, flush=True)


def record(op, flags=0, endpoint=0, domain=0, reset_id=0, start=0, end=0, phys=0):
    return struct.pack("<BBHIIIQQQ", op, 0, flags, endpoint, domain, reset_id, start, end, phys)


class Model:
    """virtio-iommu state: endpoints -> domain, domains -> bypass + mappings."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.bypass = BOOT_BYPASS
        self.endpoints = {}          # ep -> domain id
        self.domains = {}            # id -> {"bypass": bool, "eps": set, "maps": {low: (high, phys, flags)}}

    def dump(self):
        recs = [record(R_RESET), record(R_GLOBAL_BYPASS, flags=self.bypass)]
        for ep, dom in sorted(self.endpoints.items()):
            recs.append(record(R_ATTACH, flags=int(self.domains[dom]["bypass"]), endpoint=ep, domain=dom))
        for dom, d in sorted(self.domains.items()):
            for low, (high, phys, flags) in sorted(d["maps"].items()):
                recs.append(record(R_MAP, flags=flags, domain=dom, start=low, end=high, phys=phys))
        return recs

    def _drop_domain_if_empty(self, dom, recs):
        d = self.domains[dom]
        if not d["eps"]:
            del self.domains[dom]
            if d["maps"]:
                recs.append(record(R_UNMAP, domain=dom, start=0, end=U64_MAX))

    def attach(self, dom, ep, flags):
        """Returns (status, records, needs_ack)."""
        if flags & ~1:
            return S_INVAL, [], False
        bypass = bool(flags & 1)
        d = self.domains.get(dom)
        if d is not None and d["bypass"] != bypass:
            return S_INVAL, [], False
        recs, moved = [], False
        old = self.endpoints.get(ep)
        if old == dom:
            return S_OK, [], False
        if d is None:
            d = self.domains[dom] = {"bypass": bypass, "eps": set(), "maps": {}}
        recs.append(record(R_ATTACH, flags=int(bypass), endpoint=ep, domain=dom))
        if old is not None:
            moved = True
            self.domains[old]["eps"].discard(ep)
            self._drop_domain_if_empty(old, recs)
        d["eps"].add(ep)
        self.endpoints[ep] = dom
        return S_OK, recs, moved

    def detach(self, dom, ep):
        if self.endpoints.get(ep) != dom:
            return S_INVAL, [], False
        recs = [record(R_DETACH, endpoint=ep, domain=dom)]
        del self.endpoints[ep]
        self.domains[dom]["eps"].discard(ep)
        self._drop_domain_if_empty(dom, recs)
        return S_OK, recs, True

    def map(self, dom, low, high, phys, flags):
        d = self.domains.get(dom)
        if d is None:
            return S_NOENT, [], False
        if d["bypass"] or flags & ~7 or high < low:
            return S_INVAL, [], False
        for l, (h, _, _) in d["maps"].items():
            if not (h < low or high < l):
                return S_INVAL, [], False
        d["maps"][low] = (high, phys, flags)
        return S_OK, [record(R_MAP, flags=flags, domain=dom, start=low, end=high, phys=phys)], False

    def unmap(self, dom, low, high):
        d = self.domains.get(dom)
        if d is None:
            return S_NOENT, [], False
        recs, status = [], S_OK
        for l in sorted(d["maps"]):
            h = d["maps"][l][0]
            if h < low or high < l:
                continue
            if l < low or h > high:
                status = S_RANGE
                break
            del d["maps"][l]
            recs.append(record(R_UNMAP, domain=dom, start=l, end=h))
        return status, recs, bool(recs)


class Vring:
    def __init__(self):
        self.num = 0
        self.desc = self.avail = self.used = 0
        self.last_avail = 0
        self.kick = self.call = None
        self.started = False


class Daemon:
    def __init__(self, sock_path, mirror_path):
        self.model = Model()
        self.mem = []                # (gpa, size, uva, mmap, offset)
        self.vrings = [Vring(), Vring()]
        self.protocol_features = 0
        self.parked = []             # (queue, head, len, seq)
        self.mirror = None
        self.mirror_rx = b""
        self.tx_seq = 0
        self.acked = 0
        self.mirror_hello = False
        self.lsock = self._listen(sock_path)
        self.msock = self._listen(mirror_path)
        self.conn = None

    @staticmethod
    def _listen(path):
        if os.path.exists(path):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(1)
        return s

    # --- guest memory -----------------------------------------------------------------------
    def _find(self, addr, by_uva):
        for gpa, size, uva, mm, off in self.mem:
            base = uva if by_uva else gpa
            if base <= addr < base + size:
                return mm, off + addr - base
        raise ValueError("address 0x%x not in guest memory" % addr)

    def read(self, addr, n, by_uva=False):
        mm, o = self._find(addr, by_uva)
        return mm[o:o + n]

    def write(self, addr, data, by_uva=False):
        mm, o = self._find(addr, by_uva)
        mm[o:o + len(data)] = data

    # --- vhost-user -------------------------------------------------------------------------
    def recv_msg(self):
        fds = array.array("i")
        hdr, anc, _, _ = self.conn.recvmsg(12, socket.CMSG_SPACE(8 * 4))
        if not hdr:
            return None
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - (len(data) % fds.itemsize)])
        req, flags, size = struct.unpack("<III", hdr)
        payload = b""
        while len(payload) < size:
            chunk = self.conn.recv(size - len(payload))
            if not chunk:
                return None
            payload += chunk
        return req, flags, payload, list(fds)

    def reply(self, req, payload):
        self.conn.sendall(struct.pack("<III", req, 0x1 | F_REPLY, len(payload)) + payload)

    def config(self):
        return struct.pack("<QQQIIIB3x", ~0xfff & U64_MAX, 0, (1 << 39) - 1, 0, 0xffffffff,
                           PROBE_SIZE, self.model.bypass)

    def handle_vhost(self):
        m = self.recv_msg()
        if m is None:
            log("vhost-user connection closed")
            self.conn.close()
            self.conn = None
            return
        req, flags, p, fds = m
        ack = None
        if req == VHOST_USER_GET_FEATURES:
            self.reply(req, struct.pack("<Q", FEATURES))
        elif req == VHOST_USER_GET_PROTOCOL_FEATURES:
            self.reply(req, struct.pack("<Q", PROTOCOL_FEATURES))
        elif req == VHOST_USER_SET_PROTOCOL_FEATURES:
            self.protocol_features = struct.unpack("<Q", p[:8])[0]
            ack = 0
        elif req == VHOST_USER_GET_QUEUE_NUM:
            self.reply(req, struct.pack("<Q", 2))
        elif req == VHOST_USER_SET_MEM_TABLE:
            for _, _, _, mm, _ in self.mem:
                mm.close()
            self.mem = []
            nregions = struct.unpack("<I", p[:4])[0]
            for i in range(nregions):
                gpa, size, uva, off = struct.unpack("<QQQQ", p[8 + 32 * i:8 + 32 * (i + 1)])
                mm = mmap.mmap(fds[i], size + off, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                os.close(fds[i])
                self.mem.append((gpa, size, uva, mm, off))
            log("mem table: %s" % ", ".join("gpa 0x%x size 0x%x" % (r[0], r[1]) for r in self.mem))
            ack = 0
        elif req == VHOST_USER_SET_VRING_NUM:
            i, num = struct.unpack("<II", p[:8])
            self.vrings[i].num = num
            ack = 0
        elif req == VHOST_USER_SET_VRING_ADDR:
            i, _, desc, used, avail, _ = struct.unpack("<IIQQQQ", p[:40])
            v = self.vrings[i]
            v.desc, v.used, v.avail = desc, used, avail
            ack = 0
        elif req == VHOST_USER_SET_VRING_BASE:
            i, base = struct.unpack("<II", p[:8])
            self.vrings[i].last_avail = base
            ack = 0
        elif req == VHOST_USER_GET_VRING_BASE:
            i = struct.unpack("<I", p[:4])[0]
            v = self.vrings[i]
            # Deadlock rule: complete parked requests now, never wait for an ACK here
            self.complete_parked(i, force=True)
            v.started = False
            self.reply(req, struct.pack("<II", i, v.last_avail))
        elif req in (VHOST_USER_SET_VRING_KICK, VHOST_USER_SET_VRING_CALL, VHOST_USER_SET_VRING_ERR):
            u64 = struct.unpack("<Q", p[:8])[0]
            i, nofd = u64 & 0xff, u64 & 0x100
            fd = None if nofd else fds[0]
            v = self.vrings[i]
            if req == VHOST_USER_SET_VRING_KICK:
                if v.kick is not None:
                    os.close(v.kick)
                v.kick = fd
                v.started = True
            elif req == VHOST_USER_SET_VRING_CALL:
                if v.call is not None:
                    os.close(v.call)
                v.call = fd
            elif fd is not None:
                os.close(fd)
            ack = 0
        elif req == VHOST_USER_SET_VRING_ENABLE:
            ack = 0
        elif req == VHOST_USER_GET_CONFIG:
            off, size, cflags = struct.unpack("<III", p[:12])
            cfg = self.config()[off:off + size]
            log("GET_CONFIG offset %d size %d -> bypass=%d" % (off, size, self.model.bypass))
            self.reply(req, struct.pack("<III", off, size, cflags) + cfg)
        elif req == VHOST_USER_SET_CONFIG:
            off, size, _ = struct.unpack("<III", p[:12])
            data = p[12:12 + size]
            if off <= 36 < off + size:
                val = data[36 - off]
                log("SET_CONFIG bypass=%d" % val)
                if val in (0, 1) and val != self.model.bypass:
                    self.model.bypass = val
                    # Never wait for the ACK here (we are on the vhost-user thread)
                    self.send_batch([record(R_GLOBAL_BYPASS, flags=val)])
            ack = 0
        elif req in (VHOST_USER_SET_FEATURES, VHOST_USER_SET_OWNER, VHOST_USER_RESET_OWNER):
            ack = 0
        else:
            log("unhandled vhost-user request %d" % req)
            ack = 0
        if ack is not None and flags & F_NEED_REPLY:
            self.reply(req, struct.pack("<Q", ack))

    # --- rings ------------------------------------------------------------------------------
    def pop_chain(self, v, head):
        rd, wr, i = [], [], head
        while True:
            addr, ln, fl, nxt = struct.unpack("<QIHH", self.read(v.desc + 16 * i, 16, by_uva=True))
            (wr if fl & 2 else rd).append((addr, ln))
            if not fl & 1:
                return rd, wr
            i = nxt

    def push_used(self, qi, head, ln):
        v = self.vrings[qi]
        used_idx = struct.unpack("<H", self.read(v.used + 2, 2, by_uva=True))[0]
        self.write(v.used + 4 + 8 * (used_idx % v.num), struct.pack("<II", head, ln), by_uva=True)
        self.write(v.used + 2, struct.pack("<H", (used_idx + 1) & 0xffff), by_uva=True)
        if v.call is not None:
            os.write(v.call, struct.pack("<Q", 1))

    def avail_heads(self, v):
        avail_idx = struct.unpack("<H", self.read(v.avail + 2, 2, by_uva=True))[0]
        while v.last_avail != avail_idx:
            head = struct.unpack("<H", self.read(v.avail + 4 + 2 * (v.last_avail % v.num), 2, by_uva=True))[0]
            v.last_avail = (v.last_avail + 1) & 0xffff
            yield head

    def handle_requests(self):
        v = self.vrings[0]
        if not v.started or not v.num:
            return
        for head in self.avail_heads(v):
            rd, wr = self.pop_chain(v, head)
            req = b"".join(self.read(a, n) for a, n in rd)
            out_len = sum(n for _, n in wr)
            resp, recs, needs_ack = self.request(req, out_len)
            off = 0
            for a, n in wr:
                chunk = resp[off:off + n]
                if chunk:
                    self.write(a, chunk)
                off += n
            seq = self.send_batch(recs) if recs else None
            if seq is not None:
                # Completed only once QEMU has applied the records: strict invalidation for
                # UNMAP/DETACH, and no race of an emulated device's DMA with a fresh MAP
                self.parked.append((0, head, len(resp), seq))
            else:
                self.push_used(0, head, len(resp))

    def request(self, req, out_len):
        typ = req[0]
        m = self.model
        if typ == T_ATTACH:
            dom, ep, fl = struct.unpack("<III", req[4:16])
            st, recs, ack = m.attach(dom, ep, fl)
            log("ATTACH ep=0x%x dom=%d flags=%d -> %d" % (ep, dom, fl, st))
        elif typ == T_DETACH:
            dom, ep = struct.unpack("<II", req[4:12])
            st, recs, ack = m.detach(dom, ep)
            log("DETACH ep=0x%x dom=%d -> %d" % (ep, dom, st))
        elif typ == T_MAP:
            dom, low, high, phys, fl = struct.unpack("<IQQQI", req[4:36])
            st, recs, ack = m.map(dom, low, high, phys, fl)
            self.nmap = getattr(self, "nmap", 0) + 1
        elif typ == T_UNMAP:
            dom, low, high = struct.unpack("<IQQ", req[4:24])
            st, recs, ack = m.unmap(dom, low, high)
            self.nunmap = getattr(self, "nunmap", 0) + 1
        elif typ == T_PROBE:
            ep = struct.unpack("<I", req[4:8])[0]
            log("PROBE ep=0x%x" % ep)
            props = struct.pack("<HHB3xQQ", 1, 20, 1, MSI_BASE, MSI_LAST)
            props = props.ljust(PROBE_SIZE, b"\0")
            return props + bytes([S_OK, 0, 0, 0]), [], False
        else:
            return bytes([S_UNSUPP, 0, 0, 0]).rjust(out_len, b"\0")[-out_len:], [], False
        return bytes([st, 0, 0, 0]), recs, ack

    def complete_parked(self, queue=None, force=False):
        keep = []
        for q, head, ln, seq in self.parked:
            if (queue is None or q == queue) and (force or seq <= self.acked):
                self.push_used(q, head, ln)
            else:
                keep.append((q, head, ln, seq))
        self.parked = keep

    # --- mirror -----------------------------------------------------------------------------
    def mirror_send(self, typ, flags, seq, payload=b""):
        if self.mirror is None:
            return
        self.mirror.sendall(struct.pack("<HHIQ", typ, flags, len(payload), seq) + payload)

    def send_batch(self, recs, flags=0):
        """Returns the seq of the last batch, or None if the mirror is not connected."""
        if self.mirror is None:
            return None
        for i in range(0, max(len(recs), 1), MAX_RECORDS):
            part = recs[i:i + MAX_RECORDS]
            last = i + MAX_RECORDS >= len(recs)
            self.tx_seq += 1
            self.mirror_send(EVENTS, flags if last else 0, self.tx_seq, b"".join(part))
        return self.tx_seq

    def mirror_accept(self):
        if self.mirror is not None:
            self.mirror.close()
        self.mirror, _ = self.msock.accept()
        self.mirror_rx = b""
        self.tx_seq = self.acked = 0
        self.mirror_hello = False
        log("mirror connected")
        self.mirror_send(HELLO, 0, 0, struct.pack("<IHHQB7x", MAGIC, 1, 0, 0, BOOT_BYPASS))
        self.send_batch(self.model.dump(), F_SYNC)

    def mirror_lost(self):
        log("mirror disconnected")
        self.mirror.close()
        self.mirror = None
        self.complete_parked(force=True)

    def handle_mirror(self):
        data = self.mirror.recv(65536)
        if not data:
            self.mirror_lost()
            return
        self.mirror_rx += data
        while len(self.mirror_rx) >= 16:
            typ, flags, size, seq = struct.unpack("<HHIQ", self.mirror_rx[:16])
            if len(self.mirror_rx) < 16 + size:
                break
            payload = self.mirror_rx[16:16 + size]
            self.mirror_rx = self.mirror_rx[16 + size:]
            if typ == HELLO:
                magic, major, minor = struct.unpack("<IHH", payload[:8])
                log("QEMU HELLO %d.%d magic ok=%s" % (major, minor, magic == MAGIC))
                self.mirror_hello = True
            elif typ == ACK:
                if seq != self.acked + 1:
                    log("protocol error: ACK %d after %d" % (seq, self.acked))
                self.acked = seq
                self.nacks = getattr(self, "nacks", 0) + 1
                self.complete_parked()
            elif typ == FAULT:
                ep, fl, addr, reason = struct.unpack("<IIQB", payload[:17])
                log("FAULT ep=0x%x flags=%d addr=0x%x reason=%d" % (ep, fl, addr, reason))
                self.report_fault(ep, fl, addr, reason)
            elif typ == SYSTEM_RESET:
                log("SYSTEM_RESET id=%d" % seq)
                self.model.reset()
                self.complete_parked(force=True)
                self.send_batch([record(R_RESET, flags=1, reset_id=seq),
                                 record(R_GLOBAL_BYPASS, flags=self.model.bypass)], F_SYNC)
            else:
                log("protocol error: message type %d" % typ)
                self.mirror_lost()
                return

    def report_fault(self, ep, fl, addr, reason):
        v = self.vrings[1]
        if not v.started or not v.num:
            return
        for head in self.avail_heads(v):
            _, wr = self.pop_chain(v, head)
            fault = struct.pack("<B3xII4xQ", reason, fl | 0x100, ep, addr)
            self.write(wr[0][0], fault)
            self.push_used(1, head, len(fault))
            return

    # --- main loop --------------------------------------------------------------------------
    def run(self):
        while True:
            rl = [self.lsock, self.msock]
            if self.conn is not None:
                rl.append(self.conn)
            if self.mirror is not None:
                rl.append(self.mirror)
            kick = self.vrings[0].kick
            if kick is not None:
                rl.append(kick)
            r, _, _ = select.select(rl, [], [])
            if self.lsock in r:
                if self.conn is not None:
                    self.conn.close()
                self.conn, _ = self.lsock.accept()
                log("vhost-user connected")
            if self.msock in r:
                self.mirror_accept()
            if self.mirror is not None and self.mirror in r:
                self.handle_mirror()
            if self.conn is not None and self.conn in r:
                self.handle_vhost()
            if kick is not None and kick in r and kick == self.vrings[0].kick:
                os.read(kick, 8)
                self.handle_requests()


def main():
    global LOG
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket-path", required=True)
    ap.add_argument("--mirror-socket", required=True)
    ap.add_argument("--log")
    a = ap.parse_args()
    if a.log:
        LOG = open(a.log, "a")
    d = Daemon(a.socket_path, a.mirror_socket)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        d.run()
    finally:
        log("stats: maps=%d unmaps=%d acks=%d" % (getattr(d, "nmap", 0), getattr(d, "nunmap", 0),
                                                getattr(d, "nacks", 0)))


if __name__ == "__main__":
    main()

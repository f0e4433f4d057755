// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the back-end answers: ARP requests (for any address, with its own
//! MAC) and ICMP echo requests, like DPDK testpmd's `icmpecho`. Every
//! request's IPv4 and ICMP checksums are verified, and, when a payload
//! pattern is expected (the guest's `ping -p XX`), every payload byte after
//! the sender's timestamp: the data the back-end read through the table is
//! checked, and the guest's kernel checks the reply's checksum in turn.

/// The back-end's MAC address.
pub const MAC: [u8; 6] = [0x02, 0x56, 0x55, 0x49, 0x4e, 0x01];

const ETH_HLEN: usize = 14;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_ICMP: u8 = 1;
/// Bytes at the start of a ping payload that carry the sender's timestamp
/// (busybox and iputils put a `struct timeval` there).
const TIMESTAMP: usize = 16;

/// What a frame was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Arp,
    /// An echo request; whether its payload matched the expected pattern
    /// (`None`: none expected, or too short to tell).
    Echo {
        pattern_ok: Option<bool>,
    },
    /// A request with a wrong IPv4 or ICMP checksum: its data did not
    /// arrive intact.
    BadChecksum,
    /// Anything else: dropped.
    Other,
}

/// The Internet checksum of `data` (RFC 1071).
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [b] = chunks.remainder() {
        sum += u32::from(*b) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The answer to `frame` (an Ethernet frame without the virtio-net header),
/// written into `reply`, and what the frame was.
pub fn answer(frame: &[u8], pattern: Option<u8>, reply: &mut Vec<u8>) -> Verdict {
    reply.clear();
    if frame.len() < ETH_HLEN {
        return Verdict::Other;
    }
    match be16(frame, 12) {
        ETH_P_ARP => arp(frame, reply),
        ETH_P_IP => icmp(frame, pattern, reply),
        _ => Verdict::Other,
    }
}

fn arp(frame: &[u8], reply: &mut Vec<u8>) -> Verdict {
    let a = &frame[ETH_HLEN..];
    // Ethernet/IPv4 request: htype 1, ptype 0x800, hlen 6, plen 4, op 1.
    if a.len() < 28 || be16(a, 0) != 1 || be16(a, 2) != ETH_P_IP || a[4] != 6 || a[5] != 4 {
        return Verdict::Other;
    }
    if be16(a, 6) != 1 {
        return Verdict::Other;
    }
    let (sha, spa, tpa) = (&a[8..14], &a[14..18], &a[24..28]);
    reply.extend_from_slice(sha);
    reply.extend_from_slice(&MAC);
    reply.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    reply.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    reply.extend_from_slice(&MAC);
    reply.extend_from_slice(tpa);
    reply.extend_from_slice(sha);
    reply.extend_from_slice(spa);
    Verdict::Arp
}

fn icmp(frame: &[u8], pattern: Option<u8>, reply: &mut Vec<u8>) -> Verdict {
    let ip = &frame[ETH_HLEN..];
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return Verdict::Other;
    }
    let ihl = usize::from(ip[0] & 0xf) * 4;
    let total = usize::from(be16(ip, 2));
    if ihl < 20 || total < ihl + 8 || total > ip.len() || ip[9] != IPPROTO_ICMP {
        return Verdict::Other;
    }
    if checksum(&ip[..ihl]) != 0 || checksum(&ip[ihl..total]) != 0 {
        return Verdict::BadChecksum;
    }
    let msg = &ip[ihl..total];
    // Type 8; any code: busybox's `ping -p` fills the code with the
    // pattern too (it sets type, identifier, sequence and checksum only),
    // and the reply carries it back.
    if msg[0] != 8 {
        return Verdict::Other;
    }
    let data = &msg[8..];
    let pattern_ok = match pattern {
        Some(p) if data.len() > TIMESTAMP => Some(data[TIMESTAMP..].iter().all(|&b| b == p)),
        _ => None,
    };
    // Ethernet: back to the sender.
    reply.extend_from_slice(&frame[6..12]);
    reply.extend_from_slice(&MAC);
    reply.extend_from_slice(&ETH_P_IP.to_be_bytes());
    // IPv4: addresses swapped, a fresh checksum.
    let ip_at = reply.len();
    reply.extend_from_slice(&ip[..ihl]);
    reply[ip_at + 8] = 64;
    reply[ip_at + 12..ip_at + 16].copy_from_slice(&ip[16..20]);
    reply[ip_at + 16..ip_at + 20].copy_from_slice(&ip[12..16]);
    reply[ip_at + 10..ip_at + 12].fill(0);
    let c = checksum(&reply[ip_at..ip_at + ihl]);
    reply[ip_at + 10..ip_at + 12].copy_from_slice(&c.to_be_bytes());
    // ICMP: an echo reply of the same identifier, sequence and data.
    let icmp_at = reply.len();
    reply.extend_from_slice(msg);
    reply[icmp_at] = 0;
    reply[icmp_at + 2..icmp_at + 4].fill(0);
    let c = checksum(&reply[icmp_at..]);
    reply[icmp_at + 2..icmp_at + 4].copy_from_slice(&c.to_be_bytes());
    Verdict::Echo { pattern_ok }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn ping(payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&MAC);
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&ETH_P_IP.to_be_bytes());
        let total = (20 + 8 + payload.len()) as u16;
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 1, 0, 0, 10, 0, 2, 15, 10, 0, 2, 2,
        ];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        let mut icmp = vec![8, 0xa5, 0, 0, 0x12, 0x34, 0, 7];
        icmp.extend_from_slice(payload);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&icmp);
        f
    }

    #[test]
    fn an_echo_request_gets_a_reply_with_valid_checksums() {
        let mut payload = vec![0u8; TIMESTAMP];
        payload.extend(std::iter::repeat_n(0xa5, 40));
        let mut reply = Vec::new();
        let v = answer(&ping(&payload), Some(0xa5), &mut reply);
        assert_eq!(
            v,
            Verdict::Echo {
                pattern_ok: Some(true)
            }
        );
        assert_eq!(&reply[0..6], &GUEST);
        let ip = &reply[14..];
        assert_eq!(checksum(&ip[..20]), 0);
        assert_eq!(checksum(&ip[20..]), 0);
        assert_eq!(
            (&ip[12..16], &ip[16..20]),
            (&[10, 0, 2, 2][..], &[10, 0, 2, 15][..])
        );
        assert_eq!(ip[20], 0, "echo reply");
        assert_eq!(&ip[28..], &payload[..]);
        // Another pattern: told, and answered all the same.
        let v = answer(&ping(&payload), Some(0x5a), &mut reply);
        assert_eq!(
            v,
            Verdict::Echo {
                pattern_ok: Some(false)
            }
        );
    }

    #[test]
    fn a_corrupted_request_is_seen() {
        let mut f = ping(&[1, 2, 3, 4, 5]);
        let last = f.len() - 1;
        f[last] ^= 0x40;
        assert_eq!(answer(&f, None, &mut Vec::new()), Verdict::BadChecksum);
    }

    #[test]
    fn arp_is_answered_for_any_address_and_junk_is_not() {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&[10, 0, 2, 15]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 0, 2, 2]);
        let mut reply = Vec::new();
        assert_eq!(answer(&f, None, &mut reply), Verdict::Arp);
        assert_eq!(&reply[22..28], &MAC, "sender hardware address");
        assert_eq!(&reply[28..32], &[10, 0, 2, 2]);
        assert_eq!(&reply[38..42], &[10, 0, 2, 15]);
        for n in 0..f.len() {
            let _ = answer(&f[..n], None, &mut reply);
        }
        assert_eq!(answer(&[0; 60], None, &mut reply), Verdict::Other);
    }
}

//! A small NFQUEUE client: the kernel's `nfnetlink_queue` hands packets that an iptables rule
//! sent to `-j NFQUEUE --queue-num N` to a netlink socket bound to queue N, holds them, and
//! lets each go on (or drops it) when a verdict for its id comes back. The lab's netns shaper
//! (`strait lab shaper`) uses it to delay packets on a kernel without `tc netem`.
//!
//! Messages are built and parsed here by hand (`linux/netfilter/nfnetlink_queue.h`): a netlink
//! header, an `nfgenmsg` (family, version, queue number big-endian), then attributes. The codec
//! is pure and tested without a socket; [`QueueSocket`] is the I/O around it.

use std::io;
use std::os::fd::OwnedFd;

use rustix::net::{
    AddressFamily, RecvFlags, SendFlags, SocketType, bind, netlink, recv, send, socket, sockopt,
};

const NFNL_SUBSYS_QUEUE: u16 = 3;
const NFQNL_MSG_PACKET: u16 = 0;
const NFQNL_MSG_VERDICT: u16 = 1;
const NFQNL_MSG_CONFIG: u16 = 2;

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;

const NFQA_CFG_CMD: u16 = 1;
const NFQA_CFG_PARAMS: u16 = 2;
const NFQA_CFG_QUEUE_MAXLEN: u16 = 3;
const NFQA_CFG_MASK: u16 = 4;
const NFQA_CFG_FLAGS: u16 = 5;
const NFQNL_CFG_CMD_BIND: u8 = 1;
/// Only the packet's metadata (its id) comes up; the payload stays in the kernel.
const NFQNL_COPY_META: u8 = 1;
/// Hand over GSO packets whole instead of segmenting them first.
const NFQA_CFG_F_GSO: u32 = 4;

const NFQA_PACKET_HDR: u16 = 1;
const NFQA_VERDICT_HDR: u16 = 2;
/// Attribute type bits that are flags, not part of the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

const NLMSG_HDR_LEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// The verdict that lets a held packet go on (`NF_ACCEPT`).
const NF_ACCEPT: u32 = 1;

/// One thing the kernel said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A packet is held in `queue` under `id`, waiting for its verdict.
    Packet { queue: u16, id: u32 },
    /// The answer to request `seq`: 0 for success, else a positive errno.
    Ack { seq: u32, errno: i32 },
}

fn header(kind: u16, flags: u16, seq: u32, queue: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(64);
    b.extend_from_slice(&0u32.to_ne_bytes()); // length, set by `finish`
    b.extend_from_slice(&((NFNL_SUBSYS_QUEUE << 8) | kind).to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills ours in
    b.push(0); // AF_UNSPEC
    b.push(0); // NFNETLINK_V0
    b.extend_from_slice(&queue.to_be_bytes());
    b
}

fn attr(b: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = (4 + payload.len()) as u16;
    b.extend_from_slice(&len.to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(payload);
    while !b.len().is_multiple_of(4) {
        b.push(0);
    }
}

fn finish(mut b: Vec<u8>) -> Vec<u8> {
    let len = b.len() as u32;
    b[..4].copy_from_slice(&len.to_ne_bytes());
    b
}

/// Bind this socket to `queue`, with metadata-only copies, GSO packets whole and room for
/// `max_len` held packets; acknowledged.
pub fn bind_message(seq: u32, queue: u16, max_len: u32) -> Vec<u8> {
    let mut b = header(NFQNL_MSG_CONFIG, NLM_F_ACK, seq, queue);
    // struct nfqnl_msg_config_cmd { u8 command; u8 pad; __be16 pf; }
    attr(&mut b, NFQA_CFG_CMD, &[NFQNL_CFG_CMD_BIND, 0, 0, 0]);
    // struct nfqnl_msg_config_params { __be32 copy_range; u8 copy_mode; } (packed)
    let mut params = 0u32.to_be_bytes().to_vec();
    params.push(NFQNL_COPY_META);
    attr(&mut b, NFQA_CFG_PARAMS, &params);
    attr(&mut b, NFQA_CFG_QUEUE_MAXLEN, &max_len.to_be_bytes());
    attr(&mut b, NFQA_CFG_FLAGS, &NFQA_CFG_F_GSO.to_be_bytes());
    attr(&mut b, NFQA_CFG_MASK, &NFQA_CFG_F_GSO.to_be_bytes());
    finish(b)
}

/// Let packet `id` of `queue` go on (not acknowledged: errors still come back as events).
pub fn accept_message(seq: u32, queue: u16, id: u32) -> Vec<u8> {
    let mut b = header(NFQNL_MSG_VERDICT, 0, seq, queue);
    let mut hdr = NF_ACCEPT.to_be_bytes().to_vec();
    hdr.extend_from_slice(&id.to_be_bytes());
    attr(&mut b, NFQA_VERDICT_HDR, &hdr);
    finish(b)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Every event in one datagram from the kernel. A message that is cut short or malformed is
/// an error naming where; the ones before it are still returned through `events`.
pub fn parse(datagram: &[u8], events: &mut Vec<Event>) -> Result<(), String> {
    let mut at = 0;
    while at + NLMSG_HDR_LEN <= datagram.len() {
        let (Some(len), Some(kind), Some(seq)) = (
            u32_at(datagram, at),
            u16_at(datagram, at + 4),
            u32_at(datagram, at + 8),
        ) else {
            return Err(format!("netlink header cut short at byte {at}"));
        };
        let len = len as usize;
        if len < NLMSG_HDR_LEN || at + len > datagram.len() {
            return Err(format!(
                "netlink message at byte {at} claims {len} bytes of {} left",
                datagram.len() - at
            ));
        }
        let msg = &datagram[at..at + len];
        match kind {
            NLMSG_ERROR => {
                let Some(code) = msg.get(16..20) else {
                    return Err(format!("netlink error message at byte {at} has no code"));
                };
                let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
                events.push(Event::Ack {
                    seq,
                    errno: code.saturating_neg(),
                });
            }
            NLMSG_NOOP | NLMSG_DONE => {}
            k if k == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET => {
                events.push(parse_packet(msg).map_err(|e| format!("{e} (message at byte {at})"))?);
            }
            _ => {}
        }
        at += len.next_multiple_of(4);
    }
    Ok(())
}

fn parse_packet(msg: &[u8]) -> Result<Event, String> {
    let body = NLMSG_HDR_LEN + NFGENMSG_LEN;
    let Some(q) = msg.get(NLMSG_HDR_LEN + 2..body) else {
        return Err("packet message without its queue number".into());
    };
    let queue = u16::from_be_bytes([q[0], q[1]]);
    let mut at = body;
    while at + 4 <= msg.len() {
        let (Some(len), Some(kind)) = (u16_at(msg, at), u16_at(msg, at + 2)) else {
            break;
        };
        let len = len as usize;
        if len < 4 || at + len > msg.len() {
            return Err(format!("attribute at byte {at} claims {len} bytes"));
        }
        if kind & NLA_TYPE_MASK == NFQA_PACKET_HDR {
            let Some(id) = msg.get(at + 4..at + 8) else {
                return Err("packet header attribute shorter than its id".into());
            };
            let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
            return Ok(Event::Packet { queue, id });
        }
        at += len.next_multiple_of(4);
    }
    Err(format!(
        "packet message of queue {queue} without a packet header"
    ))
}

/// A netlink socket of this thread's network namespace, bound to NFQUEUE queues.
pub struct QueueSocket {
    fd: OwnedFd,
}

impl QueueSocket {
    /// Open the socket (in the calling thread's network namespace) with a receive buffer of
    /// `buffer` bytes (forced past the system's limit when we may).
    pub fn open(buffer: usize) -> io::Result<QueueSocket> {
        let fd = socket(
            AddressFamily::NETLINK,
            SocketType::RAW,
            Some(netlink::NETFILTER),
        )?;
        bind(&fd, &netlink::SocketAddrNetlink::new(0, 0))?;
        if sockopt::set_socket_recv_buffer_size_force(&fd, buffer).is_err() {
            sockopt::set_socket_recv_buffer_size(&fd, buffer)?;
        }
        Ok(QueueSocket { fd })
    }

    /// Bind `queue` and wait for the kernel's answer (before any packet can arrive on it).
    pub fn bind_queue(&self, queue: u16, max_len: u32) -> io::Result<()> {
        let seq = u32::from(queue);
        send(
            &self.fd,
            &bind_message(seq, queue, max_len),
            SendFlags::empty(),
        )?;
        let mut buf = vec![0u8; 8192];
        let mut events = Vec::new();
        loop {
            events.clear();
            let (n, _) = recv(&self.fd, &mut buf[..], RecvFlags::empty())?;
            parse(&buf[..n], &mut events).map_err(io::Error::other)?;
            for e in &events {
                if let Event::Ack { seq: s, errno } = e
                    && *s == seq
                {
                    return match errno {
                        0 => Ok(()),
                        e => Err(io::Error::from_raw_os_error(*e)),
                    };
                }
            }
        }
    }

    /// Block until the kernel says something; its events are appended to `events`.
    /// `Ok(false)`: the socket's buffer overflowed and the kernel dropped packets (ENOBUFS).
    pub fn receive(&self, buf: &mut [u8], events: &mut Vec<Event>) -> io::Result<bool> {
        match recv(&self.fd, &mut buf[..], RecvFlags::empty()) {
            Ok((n, _)) => {
                parse(&buf[..n], events).map_err(io::Error::other)?;
                Ok(true)
            }
            Err(rustix::io::Errno::NOBUFS) => Ok(false),
            Err(rustix::io::Errno::INTR) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    /// Let packet `id` of `queue` go on.
    pub fn accept(&self, queue: u16, id: u32) -> io::Result<()> {
        send(&self.fd, &accept_message(id, queue, id), SendFlags::empty())
            .map(|_| ())
            .map_err(io::Error::from)
    }

    pub fn try_clone(&self) -> io::Result<QueueSocket> {
        Ok(QueueSocket {
            fd: self.fd.try_clone()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_message_layout() {
        let m = bind_message(7, 300, 10_000);
        assert_eq!(m.len() % 4, 0);
        assert_eq!(u32_at(&m, 0), Some(m.len() as u32));
        assert_eq!(u16_at(&m, 4), Some((3 << 8) | 2));
        assert_eq!(u16_at(&m, 6), Some(NLM_F_REQUEST | NLM_F_ACK));
        assert_eq!(u32_at(&m, 8), Some(7));
        // nfgenmsg: family 0, version 0, queue 300 big-endian.
        assert_eq!(&m[16..20], &[0, 0, 1, 44]);
        // First attribute: the bind command.
        assert_eq!(u16_at(&m, 20), Some(8));
        assert_eq!(u16_at(&m, 22), Some(NFQA_CFG_CMD));
        assert_eq!(m[24], NFQNL_CFG_CMD_BIND);
        // Params: 4 + 5 bytes, padded to 12.
        assert_eq!(u16_at(&m, 28), Some(9));
        assert_eq!(u16_at(&m, 30), Some(NFQA_CFG_PARAMS));
        assert_eq!(m[36], NFQNL_COPY_META);
        assert_eq!(u16_at(&m, 42), Some(NFQA_CFG_QUEUE_MAXLEN));
        assert_eq!(&m[44..48], &10_000u32.to_be_bytes());
    }

    #[test]
    fn accept_message_layout() {
        let m = accept_message(1, 2, 0xdead_beef);
        assert_eq!(m.len(), 32);
        assert_eq!(u16_at(&m, 4), Some((3 << 8) | 1));
        assert_eq!(&m[18..20], &2u16.to_be_bytes());
        assert_eq!(u16_at(&m, 22), Some(NFQA_VERDICT_HDR));
        assert_eq!(&m[24..28], &1u32.to_be_bytes());
        assert_eq!(&m[28..32], &0xdead_beefu32.to_be_bytes());
    }

    /// A packet message as the kernel sends it: header, nfgenmsg, a packet header attribute
    /// (with the byte-order flag set, as some kernels do), and another attribute after it.
    fn packet(queue: u16, id: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&((3u16 << 8) | NFQNL_MSG_PACKET).to_ne_bytes());
        b.extend_from_slice(&0u16.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b.extend_from_slice(&[2, 0]);
        b.extend_from_slice(&queue.to_be_bytes());
        attr(&mut b, 11, &[1, 2, 3]);
        let mut hdr = id.to_be_bytes().to_vec();
        hdr.extend_from_slice(&[8, 0, 3]);
        attr(&mut b, NFQA_PACKET_HDR | 0x4000, &hdr);
        finish(b)
    }

    #[test]
    fn parses_packets_and_acks_in_one_datagram() {
        let mut d = packet(5, 42);
        d.extend(packet(6, 43));
        let mut err = vec![0u8; 36];
        err[..4].copy_from_slice(&36u32.to_ne_bytes());
        err[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        err[8..12].copy_from_slice(&9u32.to_ne_bytes());
        err[16..20].copy_from_slice(&(-16i32).to_ne_bytes());
        d.extend(err);
        let mut events = Vec::new();
        parse(&d, &mut events).expect("parses");
        assert_eq!(
            events,
            vec![
                Event::Packet { queue: 5, id: 42 },
                Event::Packet { queue: 6, id: 43 },
                Event::Ack { seq: 9, errno: 16 },
            ]
        );
    }

    #[test]
    fn malformed_datagrams_are_errors_not_panics() {
        let good = packet(1, 1);
        let mut events = Vec::new();
        // Every truncation of a good message: an error or nothing, never a panic.
        for cut in 0..good.len() {
            events.clear();
            let _ = parse(&good[..cut], &mut events);
            assert!(events.is_empty(), "cut at {cut}: {events:?}");
        }
        // A length beyond the datagram.
        let mut long = good.clone();
        long[..4].copy_from_slice(&1000u32.to_ne_bytes());
        let e = parse(&long, &mut events).expect_err("too long");
        assert!(e.contains("claims 1000 bytes"), "{e}");
        // A packet message without its packet header.
        let mut bare = good[..20].to_vec();
        bare[..4].copy_from_slice(&20u32.to_ne_bytes());
        let e = parse(&bare, &mut events).expect_err("no header");
        assert!(e.contains("without a packet header"), "{e}");
        // An attribute claiming more than there is.
        let mut bad_attr = good.clone();
        bad_attr[20..22].copy_from_slice(&200u16.to_ne_bytes());
        assert!(parse(&bad_attr, &mut events).is_err());
    }
}

//! The stream header between gateways, version 1 (see `docs/gateway.md`).
//!
//! Every tunnelled connection is one bidirectional QUIC stream. The opening side writes one
//! frame holding a [`TunnelHeader`]; the other side answers with one frame holding a
//! [`TunnelStatus`]; after an OK status the stream carries the connection's raw bytes both ways.
//!
//! A frame is `b"ST"`, a big-endian `u16` length, then that many bytes of a protobuf message
//! (prost). Frames longer than [`MAX_FRAME`] are refused.
//!
//! The opening side may write the connection's first bytes right behind the header, before the
//! status: the other side writes them to the endpoint once connected, or drops them with a
//! refusal. A sidecar that asks the ingress for an *early status* ([`EARLY_STATUS_HEADER`])
//! gets its `200` as soon as the stream is open, and then this same status frame as the first
//! bytes of its tunnel ([`parse_frame`] reads it from a buffer).
//!
//! (The module lives in `federation` because both ends of a tunnel need it: the gateways and
//! the sidecar.)

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A sidecar's drain watch on its HTTP/2 connection to its gateway's ingress: `GET` this path
/// and the gateway answers `200` when it starts shutting down; the sidecar then stops reusing
/// the tunnels of that connection (each finishes its request) and opens new ones through
/// another replica. A gateway of an earlier release answers `405` at once (no watch).
pub const DRAIN_PATH: &str = "/strait/v1/drain";

/// The ingress request header naming the cluster a CONNECT tunnel goes to (its authority is
/// `SERVICE.NAMESPACE:PORT`).
pub const CLUSTER_HEADER: &str = "strait-cluster";
/// The ingress response header carrying the reason of a refusal.
pub const REASON_HEADER: &str = "strait-reason";
/// Set (value `1`) on an ingress refusal that is this gateway replica's own: it has no link to
/// the target cluster now. Another replica of the same gateway may have one (the cluster's link
/// is up while any replica's is, and that is what routes follow), so the sidecar tries the
/// CONNECT once more through the next replica. A gateway of an earlier release never sets it.
pub const TRY_ANOTHER_REPLICA_HEADER: &str = "strait-try-another-replica";

/// Set on every ingress refusal: what refused, as one of [`Refusal`]'s names, so that a sidecar
/// tells a failure of the endpoint it chose (counted by its outlier detection) from a failure of
/// the path to it (a link down, the remote gateway's own trouble: retried, not counted against
/// the endpoint). A gateway of an earlier release never sets it.
pub const REFUSAL_HEADER: &str = "strait-refusal";

/// Why an ingress refused a tunnel (the value of [`REFUSAL_HEADER`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This gateway knows no such cluster.
    UnknownCluster,
    /// This gateway replica has no link to the cluster now.
    LinkDown,
    /// The tunnel could not be opened across the link.
    Failed,
    /// The remote gateway answered this status.
    Remote(StatusCode),
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownCluster => "unknown_cluster",
            Refusal::LinkDown => "link_down",
            Refusal::Failed => "failed",
            Refusal::Remote(c) => match c {
                StatusCode::Ok => "ok",
                StatusCode::NoEndpoint => "no_endpoint",
                StatusCode::UnknownService => "unknown_service",
                StatusCode::BadHeader => "bad_header",
                StatusCode::Unauthorized => "unauthorized",
                StatusCode::ConnectFailed => "connect_failed",
                StatusCode::UnsupportedVersion => "unsupported_version",
                StatusCode::NotAnEndpoint => "not_an_endpoint",
            },
        }
    }

    /// Whether a refusal named `name` is the endpoint's failure (it is not a serving endpoint
    /// there, or it refused the connection) rather than the path's. Unknown names (a later
    /// release's) are the path's: an endpoint is never ejected for what is not understood.
    pub fn blames_endpoint(name: &str) -> bool {
        matches!(name, "no_endpoint" | "not_an_endpoint" | "connect_failed")
    }
}

/// The ingress request header by which a sidecar asks for an early status (value `1`), and the
/// response header by which the gateway grants it (a gateway that does not know it answers as
/// usual, after the status).
pub const EARLY_STATUS_HEADER: &str = "strait-early-status";

/// The ingress request header naming the endpoint (`address:port`) of the target cluster that
/// the sidecar's load balancer chose; carried to the receiving gateway as
/// [`TunnelHeader::endpoint`].
pub const ENDPOINT_HEADER: &str = "strait-endpoint";

/// The protocol version this gateway speaks.
pub const VERSION: u32 = 1;
/// The largest frame body accepted.
pub const MAX_FRAME: usize = 8 * 1024;
const MAGIC: [u8; 2] = *b"ST";

/// What the opening gateway asks for.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TunnelHeader {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(string, tag = "2")]
    pub service: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(uint32, tag = "4")]
    pub port: u32,
    #[prost(string, tag = "5")]
    pub source_cluster: String,
    /// The SPIFFE ID of the workload that opened the tunnel.
    #[prost(string, tag = "6")]
    pub source_identity: String,
    #[prost(string, tag = "7")]
    pub request_id: String,
    /// The endpoint the sidecar's load balancer chose (`address:port`), which the receiving
    /// gateway connects to only if it is a current, serving endpoint of the service there
    /// ([`StatusCode::NotAnEndpoint`] otherwise). Empty: the receiving gateway chooses (a
    /// gateway or sidecar of an earlier release).
    #[prost(string, tag = "8")]
    pub endpoint: String,
}

/// The answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TunnelStatus {
    #[prost(enumeration = "StatusCode", tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    /// The endpoint chosen (`address:port`), for logs.
    #[prost(string, tag = "3")]
    pub endpoint: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum StatusCode {
    Ok = 0,
    /// The service exists but has no healthy endpoint here.
    NoEndpoint = 1,
    /// This cluster has no such service (or port).
    UnknownService = 2,
    /// The header is malformed.
    BadHeader = 3,
    /// The source is not allowed.
    Unauthorized = 4,
    /// Connecting to the chosen endpoint failed.
    ConnectFailed = 5,
    /// The header's version is not spoken here.
    UnsupportedVersion = 6,
    /// The endpoint the header names is not a current, serving endpoint of the service here
    /// (it left, turned unhealthy, or never was one): try another endpoint.
    NotAnEndpoint = 7,
}

/// A frame that could not be read or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream closed before a complete frame")]
    Eof,
    #[error("not a Strait frame (bad magic {0:02x?})")]
    BadMagic([u8; 2]),
    #[error("frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Write one frame.
pub async fn write_frame<W: AsyncWrite + Unpin, M: prost::Message>(
    w: &mut W,
    msg: &M,
) -> Result<(), FrameError> {
    let buf = encode_frame(msg)?;
    w.write_all(&buf).await?;
    Ok(())
}

/// Read one frame.
pub async fn read_frame<R: AsyncRead + Unpin, M: prost::Message + Default>(
    r: &mut R,
) -> Result<M, FrameError> {
    let mut head = [0u8; 4];
    r.read_exact(&mut head).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Eof,
        _ => FrameError::Io(e),
    })?;
    if head[..2] != MAGIC {
        return Err(FrameError::BadMagic([head[0], head[1]]));
    }
    let len = u16::from_be_bytes([head[2], head[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Eof,
        _ => FrameError::Io(e),
    })?;
    Ok(M::decode(body.as_slice())?)
}

/// The frame's bytes: magic, length, message.
pub fn encode_frame<M: prost::Message>(msg: &M) -> Result<Vec<u8>, FrameError> {
    let len = msg.encoded_len();
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = Vec::with_capacity(len + 4);
    buf.extend_from_slice(&MAGIC);
    buf.extend_from_slice(&(len as u16).to_be_bytes());
    msg.encode(&mut buf)
        .map_err(|e| FrameError::Io(std::io::Error::other(e.to_string())))?;
    Ok(buf)
}

/// A frame at the start of `buf`: `Ok(None)` while it is incomplete, else the message and the
/// frame's length in bytes (what follows belongs to the stream).
pub fn parse_frame<M: prost::Message + Default>(
    buf: &[u8],
) -> Result<Option<(M, usize)>, FrameError> {
    if buf.len() >= 2 && buf[..2] != MAGIC {
        return Err(FrameError::BadMagic([buf[0], buf[1]]));
    }
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    Ok(Some((M::decode(body)?, 4 + len)))
}

impl TunnelHeader {
    /// The endpoint the header names, if any (see [`TunnelHeader::endpoint`]).
    pub fn named_endpoint(&self) -> Result<Option<std::net::SocketAddr>, String> {
        if self.endpoint.is_empty() {
            return Ok(None);
        }
        self.endpoint
            .parse()
            .map(Some)
            .map_err(|_| format!("endpoint: `{}` is not ADDRESS:PORT", self.endpoint))
    }

    /// Check the fields; the error says which one is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.version != VERSION {
            return Err(format!(
                "unsupported version {} (this gateway speaks {VERSION})",
                self.version
            ));
        }
        crate::model::Name::parse("service", &self.service).map_err(|e| e.to_string())?;
        crate::model::Name::parse("namespace", &self.namespace).map_err(|e| e.to_string())?;
        crate::model::Name::parse("source_cluster", &self.source_cluster)
            .map_err(|e| e.to_string())?;
        if self.port == 0 || self.port > u32::from(u16::MAX) {
            return Err(format!("port: {} is not a valid port", self.port));
        }
        self.named_endpoint()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> TunnelHeader {
        TunnelHeader {
            version: VERSION,
            service: "echo".into(),
            namespace: "default".into(),
            port: 8080,
            source_cluster: "east".into(),
            source_identity: "spiffe://td/cluster/east/ns/default/sa/app".into(),
            request_id: "r1".into(),
            endpoint: String::new(),
        }
    }

    #[tokio::test]
    async fn frames_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &header()).await.unwrap();
        let back: TunnelHeader = read_frame(&mut buf.as_slice()).await.unwrap();
        assert_eq!(back, header());
        back.validate().unwrap();
    }

    #[test]
    fn frames_parse_from_a_buffer_piece_by_piece() {
        let status = TunnelStatus {
            code: StatusCode::NoEndpoint as i32,
            message: "no endpoint of echo.default".into(),
            endpoint: String::new(),
        };
        let mut bytes = encode_frame(&status).unwrap();
        let frame_len = bytes.len();
        bytes.extend_from_slice(b"server bytes");
        for cut in 0..frame_len {
            let r: Option<(TunnelStatus, usize)> = parse_frame(&bytes[..cut]).unwrap();
            assert!(r.is_none(), "a frame cut at {cut} bytes is incomplete");
        }
        let (back, used): (TunnelStatus, usize) = parse_frame(&bytes).unwrap().unwrap();
        assert_eq!((back, used), (status, frame_len));
        assert_eq!(&bytes[used..], b"server bytes");
        assert!(matches!(
            parse_frame::<TunnelStatus>(b"HT"),
            Err(FrameError::BadMagic(_))
        ));
        assert!(matches!(
            parse_frame::<TunnelStatus>(b"ST\xff\xff"),
            Err(FrameError::TooLarge(65535))
        ));
        assert!(matches!(
            parse_frame::<TunnelStatus>(b"ST\x00\x02\xff\xff"),
            Err(FrameError::Decode(_))
        ));
    }

    #[tokio::test]
    async fn bad_frames_are_errors() {
        let r: Result<TunnelHeader, _> = read_frame(&mut &b"GET / HTTP/1.1\r\n"[..]).await;
        assert!(matches!(r, Err(FrameError::BadMagic(_))));
        let r: Result<TunnelHeader, _> = read_frame(&mut &b"ST\xff\xff"[..]).await;
        assert!(matches!(r, Err(FrameError::TooLarge(65535))));
        let r: Result<TunnelHeader, _> =
            read_frame(&mut &b"ST\x00\x05\xff\xff\xff\xff\xff"[..]).await;
        assert!(matches!(r, Err(FrameError::Decode(_))));
        let r: Result<TunnelHeader, _> = read_frame(&mut &b"ST\x00\x09ab"[..]).await;
        assert!(matches!(r, Err(FrameError::Eof)));
        let mut h = header();
        h.version = 2;
        assert!(h.validate().unwrap_err().contains("unsupported version 2"));
        let mut h = header();
        h.service = "Bad!".into();
        assert!(h.validate().unwrap_err().contains("service"));
        let mut h = header();
        h.endpoint = "10.0.0.7".into();
        assert_eq!(
            h.validate().unwrap_err(),
            "endpoint: `10.0.0.7` is not ADDRESS:PORT"
        );
        h.endpoint = "10.0.0.7:8080".into();
        assert_eq!(
            h.named_endpoint(),
            Ok(Some("10.0.0.7:8080".parse().unwrap()))
        );
        h.endpoint = "[fd00::7]:8080".into();
        assert!(h.validate().is_ok());
        assert_eq!(header().named_endpoint(), Ok(None));
        let big = TunnelHeader {
            request_id: "x".repeat(MAX_FRAME + 1),
            ..header()
        };
        let mut buf = Vec::new();
        assert!(matches!(
            write_frame(&mut buf, &big).await,
            Err(FrameError::TooLarge(_))
        ));
    }
}

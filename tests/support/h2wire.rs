//! HTTP/2 at the frame level, for tests that must see what the gateway writes on the wire (a
//! GOAWAY, a PING) rather than what a client library makes of it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types (RFC 9113 §6).
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;

/// Flags.
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// One frame as read, and when it was read.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
    pub at: Instant,
}

impl Frame {
    /// A GOAWAY's error code (0: NO_ERROR).
    pub fn goaway_error(&self) -> Option<u32> {
        (self.kind == GOAWAY && self.payload.len() >= 8)
            .then(|| u32::from_be_bytes(self.payload[4..8].try_into().unwrap()))
    }
}

/// A frame's bytes.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The preface and an empty SETTINGS frame: what a client sends first.
pub fn client_start() -> Vec<u8> {
    [PREFACE, &frame(SETTINGS, 0, 0, &[])].concat()
}

/// The preface and SETTINGS of a client that gives the largest windows it can (each stream's and
/// the connection's), so that only the server's own limits hold its responses back.
pub fn client_start_widest() -> Vec<u8> {
    let mut start = PREFACE.to_vec();
    start.extend(frame(SETTINGS, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff]));
    start.extend(frame(
        WINDOW_UPDATE,
        0,
        0,
        &(0x7fff_ffffu32 - 65_535).to_be_bytes(),
    ));
    start
}

/// A GET's HEADERS frame (END_STREAM, END_HEADERS) on `stream`, in HPACK without Huffman
/// coding or indexing: `:method GET` and `:scheme` from the static table, `:path` and
/// `:authority` as literals.
pub fn get(stream: u32, scheme: &str, authority: &str, path: &str) -> Vec<u8> {
    let scheme = match scheme {
        "http" => 0x86,
        "https" => 0x87,
        other => panic!("scheme {other}"),
    };
    let mut block = vec![0x82, scheme];
    for (name_index, value) in [(0x04u8, path), (0x01, authority)] {
        assert!(value.len() < 127, "a short literal");
        block.push(name_index);
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    frame(HEADERS, END_STREAM | END_HEADERS, stream, &block)
}

/// What a peer saw until the server closed the connection or `limit` passed.
#[derive(Debug)]
pub struct Exchange {
    pub frames: Vec<Frame>,
    /// The server closed the connection (end of stream or reset).
    pub closed: bool,
    /// When the reading began.
    pub started: Instant,
    pub ended: Instant,
}

impl Exchange {
    /// The first frame of `kind` that is not an acknowledgement.
    pub fn first(&self, kind: u8) -> Option<&Frame> {
        self.frames
            .iter()
            .find(|f| f.kind == kind && (!matches!(kind, PING | SETTINGS) || f.flags & ACK == 0))
    }

    /// How many PINGs (not acknowledgements) the server sent.
    pub fn pings(&self) -> usize {
        self.frames
            .iter()
            .filter(|f| f.kind == PING && f.flags & ACK == 0)
            .count()
    }

    /// When `stream` ended from the server's side (END_STREAM on HEADERS or DATA).
    pub fn stream_end(&self, stream: u32) -> Option<Instant> {
        self.frames
            .iter()
            .find(|f| {
                f.stream == stream && matches!(f.kind, HEADERS | DATA) && f.flags & END_STREAM != 0
            })
            .map(|f| f.at)
    }
}

/// Reads frames for at most `limit`, acknowledging the server's PINGs when `answer_pings` (a
/// live peer) or leaving them unanswered (a vanished one).
pub async fn exchange<S>(io: &mut S, answer_pings: bool, limit: Duration) -> Exchange
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + limit;
    let mut frames = Vec::new();
    let closed = loop {
        let mut head = [0u8; 9];
        match tokio::time::timeout_at(deadline, io.read_exact(&mut head)).await {
            Err(_) => break false,
            Ok(Err(_)) => break true,
            Ok(Ok(_)) => {}
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        assert!(len <= 1 << 20, "a frame of {len} bytes");
        let mut payload = vec![0u8; len];
        match tokio::time::timeout_at(deadline, io.read_exact(&mut payload)).await {
            Err(_) => break false,
            Ok(Err(_)) => break true,
            Ok(Ok(_)) => {}
        }
        let f = Frame {
            kind: head[3],
            flags: head[4],
            stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
            payload,
            at: Instant::now(),
        };
        if answer_pings && f.kind == PING && f.flags & ACK == 0 {
            // A write to a closing connection may fail: the read that follows says so.
            let _ = io.write_all(&frame(PING, ACK, 0, &f.payload)).await;
        }
        frames.push(f);
    };
    Exchange {
        frames,
        closed,
        started,
        ended: Instant::now(),
    }
}

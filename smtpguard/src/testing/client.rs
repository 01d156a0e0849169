//! A minimal SMTP client for tests: connections from a chosen loopback
//! address (so prefixes can pick clients apart) and whole replies read
//! without buffering past them (so STARTTLS can follow).

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

/// No read waits longer than this.
pub const READ_LIMIT: Duration = Duration::from_secs(15);

/// A TCP connection from `src` (an IPv4 loopback address such as
/// `127.0.0.12`) to the IPv4 address `to`, reads bounded by [`READ_LIMIT`].
///
/// # Panics
///
/// When the socket cannot be made, bound or connected.
pub fn connect_from(src: &str, to: SocketAddr) -> TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    let src: SocketAddrV4 = format!("{src}:0").parse().expect("an IPv4 source");
    bind(fd.as_raw_fd(), &SockaddrIn::from(src)).expect("bind the source");
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 listener expected")
    };
    connect(fd.as_raw_fd(), &SockaddrIn::from(to)).expect("connect");
    let stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(READ_LIMIT)).expect("timeout");
    stream
}

/// One whole reply (all its lines), read a byte at a time so nothing past
/// it is consumed. Empty at end of stream (or on a read error).
pub fn reply(r: &mut impl Read) -> String {
    let mut text = Vec::new();
    let mut line_start = 0;
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte) {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&text).into_owned(),
            Ok(_) => text.push(byte[0]),
        }
        if byte[0] == b'\n' {
            let line = &text[line_start..];
            if line.len() < 4 || line[3] != b'-' {
                return String::from_utf8_lossy(&text).into_owned();
            }
            line_start = text.len();
        }
    }
}

/// Sends `line` with CRLF and returns the reply.
///
/// # Panics
///
/// When the write fails.
pub fn say(s: &mut (impl Read + Write), line: &str) -> String {
    s.write_all(format!("{line}\r\n").as_bytes())
        .expect("write");
    s.flush().expect("flush");
    reply(s)
}

/// Every reply until the server closes, concatenated.
pub fn rest(r: &mut impl Read) -> String {
    let mut all = String::new();
    loop {
        let got = reply(r);
        if got.is_empty() {
            return all;
        }
        all.push_str(&got);
    }
}

/// Panics unless `got` starts with `code`.
pub fn assert_code(got: &str, code: &str) {
    assert!(got.starts_with(code), "expected {code}, got {got:?}");
}

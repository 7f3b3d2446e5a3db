//! The HTTPS GET of an MTA-STS policy (RFC 8461 3.3): from
//! `https://mta-sts.DOMAIN/.well-known/mta-sts.txt`, over rustls with the
//! certificate verified, HTTP/1.1 with `Connection: close`.
//!
//! Whoever controls a recipient domain's DNS decides where this connects,
//! so it is held to what delivery may connect to, and to fixed bounds: one
//! deadline for the whole fetch, 64 KiB of policy, no redirects (RFC 8461
//! 3.3 forbids following them), only a 200 with `text/plain`.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use super::allowed_addresses;
use crate::dns::Dns;
use crate::policy::outbound::OutboundPolicy;

/// The whole fetch, connection and TLS included.
const TIMEOUT: Duration = Duration::from_secs(10);
/// RFC 8461 3.3 suggests 64 KiB as the largest policy worth reading.
const MAX_BODY: usize = 64 * 1024;
const MAX_HEAD: usize = 8 * 1024;
/// Addresses of the policy host tried, at most.
const MAX_ADDRESSES: usize = 2;

/// The policy body of `domain`, or why there is none.
pub fn policy_text(
    dns: &Dns,
    outbound: &OutboundPolicy,
    domain: &str,
    port: u16,
    tls: Arc<ClientConfig>,
) -> Result<String, String> {
    let host = format!("mta-sts.{domain}");
    let peers = allowed_addresses(dns, outbound, &host, port)?;
    let deadline = Instant::now() + TIMEOUT;
    let mut last = String::from("no address to try");
    for peer in peers.into_iter().take(MAX_ADDRESSES) {
        match get(peer, &host, Arc::clone(&tls), deadline) {
            Ok(response) => return policy_of_response(&response),
            Err(why) => last = format!("{host}[{}]: {why}", peer.ip()),
        }
    }
    Err(last)
}

fn remaining(deadline: Instant) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("timed out".into());
    }
    Ok(left)
}

/// The raw response, read until the server closes or the announced
/// length is in.
fn get(
    peer: SocketAddr,
    host: &str,
    tls: Arc<ClientConfig>,
    deadline: Instant,
) -> Result<Vec<u8>, String> {
    let tcp = TcpStream::connect_timeout(&peer, remaining(deadline)?)
        .map_err(|e| format!("cannot connect: {e}"))?;
    let name = ServerName::try_from(host.to_string()).map_err(|e| format!("bad name: {e}"))?;
    let connection = ClientConnection::new(tls, name).map_err(|e| format!("TLS: {e}"))?;
    let mut stream = StreamOwned::new(connection, tcp);
    let request = format!(
        "GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: {host}\r\nUser-Agent: petrel\r\n\
         Accept: text/plain\r\nConnection: close\r\n\r\n"
    );
    stream
        .sock
        .set_write_timeout(Some(remaining(deadline)?))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut response = Vec::new();
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        stream
            .sock
            .set_read_timeout(Some(remaining(deadline)?))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buffer[..n]),
            // A server that closes without TLS close_notify: what came is
            // checked against its own length below.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => break,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err("timed out".into());
            }
            Err(e) => return Err(format!("cannot read the response: {e}")),
        }
        if response.len() > MAX_HEAD + MAX_BODY + 1024 {
            return Err("response larger than 64 KiB".into());
        }
        if is_complete(&response) {
            break;
        }
    }
    Ok(response)
}

struct Head<'a> {
    status: &'a str,
    content_type: Option<&'a str>,
    content_length: Option<usize>,
    chunked: bool,
    body_start: usize,
}

fn head(response: &[u8]) -> Option<Result<Head<'_>, String>> {
    let end = memchr::memmem::find(response, b"\r\n\r\n")?;
    let Ok(text) = std::str::from_utf8(&response[..end]) else {
        return Some(Err("HTTP header is not text".into()));
    };
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    let mut head = Head {
        status,
        content_type: None,
        content_length: None,
        chunked: false,
        body_start: end + 4,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-type" => head.content_type = Some(value),
            "content-length" => head.content_length = value.parse().ok(),
            "transfer-encoding" => head.chunked = value.eq_ignore_ascii_case("chunked"),
            _ => {}
        }
    }
    Some(Ok(head))
}

fn is_complete(response: &[u8]) -> bool {
    match head(response) {
        Some(Ok(head)) if head.chunked => response.ends_with(b"\r\n0\r\n\r\n"),
        Some(Ok(Head {
            content_length: Some(length),
            body_start,
            ..
        })) => response.len() >= body_start + length,
        _ => false,
    }
}

/// The body of a 200 text/plain response.
fn policy_of_response(response: &[u8]) -> Result<String, String> {
    let head = head(response).ok_or("no complete HTTP header")??;
    let mut status = head.status.split(' ');
    let version = status.next().unwrap_or_default();
    let code = status.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 response: {:?}", head.status));
    }
    if code != "200" {
        return Err(format!("HTTP status {code} (redirects are not followed)"));
    }
    let media_type = head
        .content_type
        .and_then(|t| t.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase());
    if media_type.as_deref() != Some("text/plain") {
        return Err(format!(
            "content type {:?}, not text/plain",
            head.content_type.unwrap_or("")
        ));
    }
    let raw = &response[head.body_start..];
    let body = if head.chunked {
        dechunk(raw)?
    } else if let Some(length) = head.content_length {
        raw.get(..length)
            .ok_or("response shorter than its Content-Length")?
            .to_vec()
    } else {
        raw.to_vec()
    };
    if body.len() > MAX_BODY {
        return Err("policy larger than 64 KiB".into());
    }
    String::from_utf8(body).map_err(|_| "policy is not UTF-8".to_string())
}

/// HTTP/1.1 chunked transfer coding.
fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = memchr::memmem::find(raw, b"\r\n").ok_or("truncated chunk")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err("policy larger than 64 KiB".into());
        }
        let chunk = raw.get(..size).ok_or("truncated chunk")?;
        body.extend_from_slice(chunk);
        raw = raw.get(size + 2..).ok_or("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "version: STSv1\r\nmode: enforce\r\nmx: mx.example\r\nmax_age: 86400\r\n";

    #[test]
    fn responses_plain_and_chunked() {
        let plain = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\n\r\n{POLICY}",
            POLICY.len()
        );
        assert!(is_complete(plain.as_bytes()));
        assert_eq!(policy_of_response(plain.as_bytes()).unwrap(), POLICY);
        let chunked = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
             10\r\n{}\r\n{:x}\r\n{}\r\n0\r\n\r\n",
            &POLICY[..16],
            POLICY.len() - 16,
            &POLICY[16..]
        );
        assert!(is_complete(chunked.as_bytes()));
        assert_eq!(policy_of_response(chunked.as_bytes()).unwrap(), POLICY);
        let closed = format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{POLICY}");
        assert_eq!(policy_of_response(closed.as_bytes()).unwrap(), POLICY);
    }

    #[test]
    fn what_is_refused() {
        for response in [
            "HTTP/1.1 301 Moved\r\nLocation: https://evil.example/\r\n\r\n".to_string(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<html>".to_string(),
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nversion: S".to_string(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 99\r\n\r\nshort"
                .to_string(),
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n{}",
                "x".repeat(MAX_BODY + 1)
            ),
            "SSH-2.0-OpenSSH\r\n\r\n".to_string(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
                .to_string(),
        ] {
            assert!(
                policy_of_response(response.as_bytes()).is_err(),
                "{response:.60}"
            );
        }
    }
}

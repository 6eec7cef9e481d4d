//! HTTP/1.1 on a Unix socket, one request per connection: `httparse`
//! parses the request head; this module reads the body, writes the
//! response and closes. Every malformed request gets a 400 whose JSON body
//! says what was wrong.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Longest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `PUT`, …
    pub method: String,
    /// The path, without a query string.
    pub path: String,
    /// The body (empty if none).
    pub body: Vec<u8>,
}

/// A response about to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// Extra headers (name, value).
    pub headers: Vec<(&'static str, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON body.
    pub fn json(status: u16, v: &serde_json::Value) -> Self {
        let mut body = v.to_string().into_bytes();
        body.push(b'\n');
        Self {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    /// `{"error": msg}`.
    pub fn error(status: u16, msg: impl Into<String>) -> Self {
        Self::json(status, &serde_json::json!({ "error": msg.into() }))
    }

    /// A text body.
    pub fn text(status: u16, content_type: &'static str, body: String) -> Self {
        Self {
            status,
            content_type,
            headers: Vec::new(),
            body: body.into_bytes(),
        }
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            409 => "Conflict",
            411 => "Length Required",
            413 => "Content Too Large",
            500 => "Internal Server Error",
            501 => "Not Implemented",
            503 => "Service Unavailable",
            _ => "",
        }
    }

    /// The bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.reason(),
            self.content_type,
            self.body.len()
        );
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// Why a request could not be read; each becomes an error response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// The bytes are not an HTTP/1.x request.
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    /// The head is too long.
    #[error("request head longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    /// The body is too long.
    #[error("request body longer than {MAX_BODY} bytes")]
    BodyTooLong,
    /// Chunked or other transfer encodings.
    #[error("Transfer-Encoding is not supported; send Content-Length")]
    LengthRequired,
    /// The client went away or stalled; nothing can be answered.
    #[error("connection: {0}")]
    Gone(String),
}

impl ReadError {
    /// The response to send, if the client can still receive one.
    pub fn response(&self) -> Option<Response> {
        let status = match self {
            Self::Malformed(_) => 400,
            Self::HeadTooLong | Self::BodyTooLong => 413,
            Self::LengthRequired => 411,
            Self::Gone(_) => return None,
        };
        Some(Response::error(status, self.to_string()))
    }
}

/// Parse a complete request head in `buf`: `Ok(None)` if more bytes are
/// needed, else the request (without body), the head length and the
/// content length.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Request, usize, usize)>, ReadError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ReadError::Malformed(e.to_string())),
    };
    let method = req.method.unwrap_or_default().to_string();
    let target = req.path.unwrap_or_default();
    if !target.starts_with('/') {
        return Err(ReadError::Malformed(format!(
            "request target {target:?} is not a path"
        )));
    }
    let path = target.split(['?', '#']).next().unwrap_or("/").to_string();
    let mut length = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ReadError::LengthRequired);
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| {
                    ReadError::Malformed(format!(
                        "Content-Length {:?} is not a number",
                        String::from_utf8_lossy(h.value)
                    ))
                })?;
        }
    }
    if length > MAX_BODY {
        return Err(ReadError::BodyTooLong);
    }
    Ok(Some((
        Request {
            method,
            path,
            body: Vec::new(),
        },
        head_len,
        length,
    )))
}

/// Read one request from `stream`.
pub fn read_request(stream: &mut UnixStream) -> Result<Request, ReadError> {
    let gone = |e: std::io::Error| ReadError::Gone(e.to_string());
    stream.set_read_timeout(Some(READ_TIMEOUT)).map_err(gone)?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (mut req, head_len, length) = loop {
        if let Some(parsed) = parse_head(&buf)? {
            break parsed;
        }
        if buf.len() > MAX_HEAD {
            return Err(ReadError::HeadTooLong);
        }
        let n = stream.read(&mut chunk).map_err(gone)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                ReadError::Gone("closed before a request".into())
            } else {
                ReadError::Malformed("connection closed inside the request head".into())
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut body = buf.split_off(head_len);
    while body.len() < length {
        let n = stream.read(&mut chunk).map_err(gone)?;
        if n == 0 {
            return Err(ReadError::Malformed(format!(
                "body shorter than its Content-Length ({} of {length} bytes)",
                body.len()
            )));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    req.body = body;
    Ok(req)
}

/// Write `resp` and close the write side.
pub fn write_response(stream: &mut UnixStream, resp: &Response) -> std::io::Result<()> {
    stream.write_all(&resp.encode())?;
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_or_say_why_not() {
        let (r, n, len) =
            parse_head(b"PUT /checkpoint?x=1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
                .unwrap()
                .unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), len),
            ("PUT", "/checkpoint", 2)
        );
        assert_eq!(n, 51);
        assert_eq!(
            parse_head(b"GET /status HTTP/1.1\r\nHost: x").unwrap(),
            None
        );
        for bad in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET status HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nContent-Length: lots\r\n\r\n",
            b"\x00\x01\x02 / HTTP/1.1\r\n\r\n",
        ] {
            let e = parse_head(bad).unwrap_err();
            assert!(matches!(e, ReadError::Malformed(_)), "{bad:?}: {e:?}");
            assert_eq!(e.response().unwrap().status, 400);
        }
        let e = parse_head(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err();
        assert_eq!(e.response().unwrap().status, 411);
        let big = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_BODY + 1);
        assert_eq!(parse_head(big.as_bytes()), Err(ReadError::BodyTooLong));
    }

    #[test]
    fn responses_carry_length_and_close() {
        let r = Response::error(400, "bad");
        let text = String::from_utf8(r.encode()).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
        assert!(text.contains("Content-Length: 16\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n{\"error\":\"bad\"}\n"), "{text}");
    }

    #[test]
    fn requests_are_read_from_a_socket() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"PATCH /vm HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"state\":\"paused\"}")
            .unwrap();
        b.write_all(b"\n").unwrap();
        let r = read_request(&mut a).unwrap();
        assert_eq!(r.body, b"{\"state\":\"paused\"}\n");
        let (mut a, mut b) = UnixStream::pair().unwrap();
        b.write_all(b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}")
            .unwrap();
        b.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(matches!(read_request(&mut a), Err(ReadError::Malformed(_))));
    }
}

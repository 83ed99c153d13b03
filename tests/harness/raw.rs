//! Frames by hand: a raw connection and MessagePack maps built as a client in another
//! language would build them, to test the wire format itself.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// A raw connection speaking frames by hand, to test the wire format itself.
pub struct Raw {
    pub stream: UnixStream,
}

impl Raw {
    pub async fn connect(socket: &Path) -> Raw {
        Raw {
            stream: UnixStream::connect(socket).await.unwrap(),
        }
    }

    /// Connects and completes the handshake.
    pub async fn ready(socket: &Path) -> Raw {
        let mut raw = Raw::connect(socket).await;
        raw.send(&msgpack_map(&[
            ("id", Val::U(0)),
            ("op", Val::S("hello")),
            ("version", Val::U(1)),
        ]))
        .await;
        let reply = raw.recv().await.expect("hello answered");
        assert_eq!(field(&reply, "code"), Some(rmpv::Value::from(0)));
        raw
    }

    /// Sends one frame with this body.
    pub async fn send(&mut self, body: &[u8]) {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(body);
        self.stream.write_all(&frame).await.unwrap();
    }

    /// Reads one frame body and decodes it; `None` at end of stream.
    pub async fn recv(&mut self) -> Option<rmpv::Value> {
        let mut len = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(30), self.stream.read_exact(&mut len))
            .await
            .expect("a reply within 30 s")
            .ok()?;
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        self.stream.read_exact(&mut body).await.ok()?;
        Some(rmpv::decode::read_value(&mut &body[..]).expect("a MessagePack reply"))
    }

    /// Whether the server has closed the connection (reads reach end of stream).
    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// A field of a MessagePack map.
pub fn field(map: &rmpv::Value, name: &str) -> Option<rmpv::Value> {
    map.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .map(|(_, v)| v.clone())
}

/// Values for [`msgpack_map`].
pub enum Val<'a> {
    U(u64),
    I(i64),
    S(&'a str),
    B(&'a [u8]),
}

/// Encodes a MessagePack map with string keys, as a client in another language would.
pub fn msgpack_map(fields: &[(&str, Val)]) -> Vec<u8> {
    let map = rmpv::Value::Map(
        fields
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Val::U(n) => rmpv::Value::from(*n),
                    Val::I(n) => rmpv::Value::from(*n),
                    Val::S(s) => rmpv::Value::from(*s),
                    Val::B(b) => rmpv::Value::Binary(b.to_vec()),
                };
                (rmpv::Value::from(*k), v)
            })
            .collect(),
    );
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &map).unwrap();
    out
}

//! The floor: a Unix-socket server with the daemon's framing and codec that answers every
//! frame at once with a canned `kv.get` hit of the configured size, addressed to the
//! request's id. It reads and writes the way the daemon's connection loop does (every
//! complete frame of a read decoded in place, the replies written into one buffer, one
//! write per batch), so whatever the daemon costs on top of this is the daemon's own work.

use std::path::Path;

use bytes::{Buf, Bytes, BytesMut};
use ddbcached_protocol::codec::{
    complete_frame, decode_request_ref, write_reply, FRAME_HEADER_BYTES,
};
use ddbcached_protocol::{Reply, Versioned};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Serves until the process is stopped.
pub async fn serve(socket: &Path, value_bytes: usize) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)?;
    let value = Bytes::from(vec![b'v'; value_bytes]);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let value = value.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, value).await {
                        eprintln!("echo connection failed: {e:#}");
                    }
                });
            }
            Err(e) => {
                eprintln!("echo accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

async fn answer(mut stream: UnixStream, value: Bytes) -> anyhow::Result<()> {
    let reply = Reply::Value(Some(Versioned { ts: 1, value }));
    let mut input = BytesMut::new();
    let mut output = Vec::new();
    loop {
        input.reserve(16 * 1024);
        if stream.read_buf(&mut input).await? == 0 {
            return Ok(());
        }
        while let Some(len) = complete_frame(&input, MAX_FRAME)? {
            let body = &input[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len];
            let id = decode_request_ref(body).ok().map(|(id, _)| id);
            write_reply(&mut output, id, &reply);
            input.advance(FRAME_HEADER_BYTES + len);
        }
        stream.write_all(&output).await?;
        output.clear();
    }
}

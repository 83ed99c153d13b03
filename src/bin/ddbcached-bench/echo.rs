//! The floor: a Unix-socket server with the daemon's framing that answers every frame at
//! once with a canned `kv.get` hit of the configured size, addressed to the request's id.
//! Whatever the daemon costs on top of this is the daemon's own work.

use std::path::Path;

use bytes::Bytes;
use ddbcached_protocol::codec::{decode_request, encode_reply, frame_codec};
use ddbcached_protocol::{Reply, Versioned};
use futures::{SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::{FramedRead, FramedWrite};

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

async fn answer(stream: UnixStream, value: Bytes) -> anyhow::Result<()> {
    let (rd, wr) = stream.into_split();
    let mut frames = FramedRead::new(rd, frame_codec(MAX_FRAME));
    let mut sink = FramedWrite::new(wr, frame_codec(MAX_FRAME));
    let reply = Reply::Value(Some(Versioned { ts: 1, value }));
    while let Some(frame) = frames.next().await {
        let id = decode_request(&frame?).ok().map(|(id, _)| id);
        sink.feed(encode_reply(id, &reply)).await?;
        // Batch like the daemon's writer: flush once nothing more is waiting.
        if frames.read_buffer().is_empty() {
            SinkExt::<Bytes>::flush(&mut sink).await?;
        }
    }
    // Replies fed after the last flush must still leave before the connection closes.
    SinkExt::<Bytes>::flush(&mut sink).await?;
    Ok(())
}

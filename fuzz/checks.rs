//! What each fuzz target checks, shared with the test that replays the committed corpus
//! (`tests/corpus.rs`), so that every input a fuzzer kept or crashed on stays a regression
//! test without a fuzzer in CI.
//!
//! A check panics when the property fails; returning means the input was handled.

// Each fuzz target uses one of these.
#![allow(dead_code)]

use bytes::Bytes;
use bytes::BytesMut;
use ddbcached_protocol::codec::{
    complete_frame, decode_request, decode_request_ref, decode_response, encode_reply,
    encode_request, frame_codec, is_frame_too_large, FRAME_HEADER_BYTES,
};
use ddbcached_protocol::{Reply, Request};
use tokio_util::codec::Decoder;

/// Small, so that inputs reach the oversized-frame path as well as whole frames.
const MAX_FRAME_BYTES: usize = 4096;

/// A connection's bytes, as the daemon reads them: the first byte picks the size of the
/// reads (1 to 64 bytes), the rest is the stream. The daemon's splitter
/// ([`complete_frame`]) cuts the same frames as the clients' codec and refuses the same
/// oversized prefix; every frame is decoded as a request; a trailing partial frame is an
/// error at end of stream, not a frame.
pub fn frames(data: &[u8]) {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let mut codec = frame_codec(MAX_FRAME_BYTES);
    let mut buf = BytesMut::new();
    let mut split = Vec::new();
    for read in stream.chunks(usize::from(cut % 64) + 1) {
        buf.extend_from_slice(read);
        split.extend_from_slice(read);
        loop {
            let by_splitter = complete_frame(&split, MAX_FRAME_BYTES);
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= MAX_FRAME_BYTES);
                    assert_eq!(by_splitter, Ok(Some(frame.len())));
                    let body = &split[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + frame.len()];
                    assert_eq!(body, &frame[..]);
                    request(&frame);
                    split.drain(..FRAME_HEADER_BYTES + frame.len());
                }
                Ok(None) => {
                    assert_eq!(by_splitter, Ok(None));
                    break;
                }
                Err(e) => {
                    assert!(is_frame_too_large(&e), "unexpected codec error: {e}");
                    assert!(
                        by_splitter.is_err(),
                        "the splitter accepted an oversized frame"
                    );
                    return;
                }
            }
        }
    }
    match codec.decode_eof(&mut buf) {
        Ok(Some(frame)) => panic!("a frame appeared at end of stream: {} bytes", frame.len()),
        Ok(None) => assert!(buf.is_empty()),
        Err(_) => assert!(
            !buf.is_empty(),
            "an error at end of stream with nothing left"
        ),
    }
}

/// One request body: either it decodes, and then encoding the request again gives a body
/// that decodes to the same request and id, or it is refused with a message and a code
/// whose error reply encodes.
pub fn request(body: &[u8]) {
    // The borrowing decoder reads every body as the owning one does.
    assert_eq!(
        decode_request_ref(body).map(|(id, r)| (id, r.into_owned())),
        decode_request(body)
    );
    match decode_request(body) {
        Ok((id, req)) => {
            let again = encode_request(id, &req);
            assert_eq!(decode_request(&again), Ok((id, req)));
        }
        Err(e) => {
            assert!(!e.message.is_empty());
            let reply = encode_reply(e.id, &Reply::error(e.code, e.message));
            let response = decode_response(&reply).expect("an error reply decodes");
            assert_eq!(response.id(), e.id);
            match response.into_reply(&Request::Ping) {
                Ok(Reply::Error(s)) => assert_eq!(s.known_code(), Some(e.code)),
                other => panic!("an error reply read as {other:?}"),
            }
        }
    }
}

/// One response body, as the client reads it: decoding never panics, reading it as the
/// answer to any operation never panics, and an error code is an error reply whatever the
/// operation.
pub fn response(body: &[u8]) {
    let Ok(response) = decode_response(body) else {
        return;
    };
    let key = || Bytes::from_static(b"k");
    let requests = [
        Request::Hello {
            version: 1,
            client: None,
        },
        Request::Ping,
        Request::Health,
        Request::KvGet {
            ns: "n".into(),
            key: key(),
            before: None,
            consistent: false,
        },
        Request::KvLatestTs {
            ns: "n".into(),
            key: key(),
        },
        Request::KvTimestamps {
            ns: "n".into(),
            key: key(),
        },
        Request::KvScan {
            ns: "n".into(),
            keys_only: false,
        },
        Request::KvScan {
            ns: "n".into(),
            keys_only: true,
        },
        Request::LogPosition { topic: "t".into() },
        Request::LogScan {
            topic: "t".into(),
            from: 1,
            until: 2,
        },
    ];
    for request in &requests {
        let reply = response.clone().into_reply(request);
        if response.is_error() {
            assert!(matches!(reply, Ok(Reply::Error(_))), "{reply:?}");
        }
    }
}

//! The floor of the DynamoDB API rows: an HTTP/1.1 server (hyper, keep-alive, like the
//! daemon's front) that answers every request at once with one canned answer, which the
//! SDK reads as a GetItem's item or as a Query's. Whatever an SDK call to it costs is the
//! SDK's and HTTP's share of an API hit; the daemon's front costs the rest.

use std::convert::Infallible;

use bytes::Bytes;
use http::{HeaderValue, Response};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Serves on `listen` until the process is stopped.
pub async fn serve(listen: &str, value_bytes: usize) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let value = aws_smithy_types::base64::encode(vec![b'v'; value_bytes]);
    let item =
        format!(r#"{{"pk":{{"S":"item-00000000"}},"sk":{{"N":"1"}},"v":{{"B":"{value}"}}}}"#);
    let body = Bytes::from(format!(
        r#"{{"Item":{item},"Items":[{item}],"Count":1,"ScannedCount":1}}"#
    ));
    let crc = HeaderValue::from(crc32fast::hash(&body));
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let (body, crc) = (body.clone(), crc.clone());
        tokio::spawn(async move {
            let service = service_fn(move |_request| {
                let mut response = Response::new(Full::new(body.clone()));
                let h = response.headers_mut();
                h.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/x-amz-json-1.0"),
                );
                h.insert("x-amz-crc32", crc.clone());
                h.insert("x-amzn-requestid", HeaderValue::from_static("ECHO"));
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            if let Err(e) = connection.await {
                eprintln!("API echo connection failed: {e}");
            }
        });
    }
}

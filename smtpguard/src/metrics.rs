//! The optional Prometheus endpoint (`metrics.listen`): `GET /metrics` over
//! HTTP/1.1 (hyper), answered with whatever text the daemon renders at each
//! scrape (see `daemon::prometheus`). Any other request gets `404`.
//!
//! Scrapers are trusted no more than SMTP clients: a request head larger
//! than [`MAX_REQUEST_BYTES`] is refused, one not complete within
//! [`REQUEST_TIMEOUT`] is dropped, a connection is closed after its one
//! answer and never lives longer than [`CONNECTION_DEADLINE`], and at most
//! [`MAX_CONNECTIONS`] are open at once (more wait in the listen backlog).

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::prometheus_text;
use tokio::{net::TcpStream, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::accept::serve_each;

/// At most this many scrapes are served at once.
pub const MAX_CONNECTIONS: usize = 8;
/// The largest request head read, in bytes (hyper's smallest buffer).
pub const MAX_REQUEST_BYTES: usize = 8192;
/// How long a client may take to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection lives, answer included.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);

/// Renders the exposition text for one scrape (it may block: it runs on a
/// blocking thread).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address is taken or not ours.
    #[error("metrics.listen: cannot listen on {address}")]
    Bind {
        /// `metrics.listen`.
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The socket cannot be served by the runtime.
    #[error("cannot serve metrics on {address}")]
    Serve {
        /// The bound address.
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the metrics address at startup, so a taken port stops the start
/// with an error naming `metrics.listen` instead of a log line later.
///
/// # Errors
///
/// [`MetricsError::Bind`].
pub fn bind(address: SocketAddr) -> Result<std::net::TcpListener, MetricsError> {
    let bind_error = |source| MetricsError::Bind { address, source };
    let listener = std::net::TcpListener::bind(address).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    Ok(listener)
}

/// Serves `GET /metrics` on `listener` (from [`bind`]) until `shutdown`,
/// then lets the scrapes in progress finish and returns.
pub async fn serve(listener: std::net::TcpListener, render: Render, shutdown: CancellationToken) {
    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(source) => {
            let e = MetricsError::Serve { address, source };
            tracing::error!(error = %e, "the metrics endpoint is off");
            return;
        }
    };
    tracing::info!(%address, "serving Prometheus metrics on /metrics");
    let connections = TaskTracker::new();
    let cap = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    serve_each(
        &listener,
        "metrics endpoint",
        Some(cap),
        &connections,
        &shutdown,
        |stream, _| connection(stream, Arc::clone(&render), shutdown.clone()),
    )
    .await;
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// One connection: one request, one answer, then close.
async fn connection(stream: TcpStream, render: Render, shutdown: CancellationToken) {
    let service = service_fn(move |request: Request<Incoming>| {
        let render = Arc::clone(&render);
        async move { Ok::<_, Infallible>(respond(&request, render).await) }
    });
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .max_buf_size(MAX_REQUEST_BYTES)
        .keep_alive(false)
        // As Prometheus and the old endpoint wrote them (`Content-Type`).
        .title_case_headers(true);
    let conn = http.serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    let served = tokio::time::timeout(CONNECTION_DEADLINE, async {
        let mut stopping = false;
        loop {
            tokio::select! {
                result = conn.as_mut() => break result,
                () = shutdown.cancelled(), if !stopping => {
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    })
    .await;
    match served {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection failed"),
        Err(_) => tracing::debug!("metrics connection over its deadline; closed"),
    }
}

async fn respond(request: &Request<Incoming>, render: Render) -> Response<Full<Bytes>> {
    let uri = request.uri();
    let (status, content_type, body) =
        if request.method() == Method::GET && uri.path() == "/metrics" && uri.query().is_none() {
            let body = tokio::task::spawn_blocking(move || render())
                .await
                .unwrap_or_default();
            (StatusCode::OK, prometheus_text::CONTENT_TYPE, body)
        } else {
            (
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "only GET /metrics is served\n".to_string(),
            )
        };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Serves a fixed text; returns the address and the shutdown token.
    fn start() -> (SocketAddr, CancellationToken) {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let address = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let render: Render = Arc::new(|| "smtpguard_up 1\n".to_string());
        tokio::spawn(serve(listener, render, shutdown.clone()));
        (address, shutdown)
    }

    async fn exchange(address: SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(
            Duration::from_secs(10),
            stream.read_to_string(&mut response),
        )
        .await
        .expect("the endpoint closes after its answer")
        .unwrap();
        response
    }

    #[tokio::test]
    async fn get_metrics_is_answered_and_the_connection_closed() {
        let (address, shutdown) = start();
        // No `Connection: close`: the endpoint closes anyway.
        let response = exchange(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert!(head.contains("Content-Type: text/plain"), "{head}");
        assert_eq!(body, "smtpguard_up 1\n");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn anything_else_is_404() {
        let (address, shutdown) = start();
        for request in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        ] {
            let response = exchange(address, request).await;
            assert!(response.starts_with("HTTP/1.1 404 "), "{response}");
            assert!(
                response.ends_with("only GET /metrics is served\n"),
                "{response}"
            );
        }
        shutdown.cancel();
    }

    #[tokio::test]
    async fn an_oversized_request_head_is_refused() {
        let (address, shutdown) = start();
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        request.extend(std::iter::repeat_n(b'a', 4 * MAX_REQUEST_BYTES));
        request.extend(b"\r\n\r\n");
        let mut stream = TcpStream::connect(address).await.unwrap();
        // The endpoint may close before the whole head is written.
        let _ = stream.write_all(&request).await;
        let mut response = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response))
            .await
            .expect("closed");
        let response = String::from_utf8_lossy(&response);
        assert!(!response.contains("200"), "{response}");
        shutdown.cancel();
    }
}

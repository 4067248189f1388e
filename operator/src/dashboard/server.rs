//! The dashboard's HTTP server. Audience: the user's own browser on this machine. It listens on
//! 127.0.0.1 only, answers only requests whose `Host` is that loopback address (so a web page
//! elsewhere cannot read it through DNS rebinding), serves read-only `GET`s, and forbids the
//! page from loading anything but itself (`Content-Security-Policy`).

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Graph;

const INDEX: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/style.css");

/// Binds the dashboard on 127.0.0.1 (`port` 0 picks a free one).
pub use crate::loopback_http::bind;

/// The URL to open for a bound listener.
pub fn url(listener: &TcpListener) -> String {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    format!("http://127.0.0.1:{port}/")
}

fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static("default-src 'self'; img-src 'self' data:"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Answers one request (pure apart from reading the latest graph).
pub fn handle<B>(req: &Request<B>, port: u16, graph: &Graph) -> Response<Full<Bytes>> {
    if !crate::loopback_http::host_is_loopback(req, port) {
        return respond(
            StatusCode::FORBIDDEN,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"the dashboard answers only http://127.0.0.1 requests\n"),
        );
    }
    if req.method() != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"read-only\n"),
        );
    }
    match req.uri().path() {
        "/" => respond(
            StatusCode::OK,
            "text/html; charset=utf-8",
            Bytes::from_static(INDEX.as_bytes()),
        ),
        "/app.js" => respond(
            StatusCode::OK,
            "text/javascript; charset=utf-8",
            Bytes::from_static(APP_JS.as_bytes()),
        ),
        "/style.css" => respond(
            StatusCode::OK,
            "text/css; charset=utf-8",
            Bytes::from_static(STYLE.as_bytes()),
        ),
        "/api/graph" => respond(
            StatusCode::OK,
            "application/json",
            Bytes::from(serde_json::to_vec(graph).unwrap_or_default()),
        ),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"not found\n"),
        ),
    }
}

/// Serves until `stop` is cancelled; every request sees the latest graph on `graph`.
pub async fn serve(listener: TcpListener, graph: watch::Receiver<Graph>, stop: CancellationToken) {
    let handle = move |req: &Request<_>, port| handle(req, port, &graph.borrow());
    crate::loopback_http::serve(listener, "dashboard", handle, stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str, host: &str) -> Request<()> {
        Request::get(path)
            .header(header::HOST, host)
            .body(())
            .unwrap()
    }

    #[tokio::test]
    async fn serves_the_page_on_loopback_only() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = bind(0).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(url(&listener), format!("http://127.0.0.1:{port}/"));
        let (_tx, rx) = watch::channel(Graph::default());
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, rx, stop.clone()));
        let mut c = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        c.write_all(
            format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut page = String::new();
        c.read_to_string(&mut page).await.unwrap();
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("<script src=\"/app.js\">"), "{page}");
        match crate::loopback_http::non_loopback_ip() {
            Some(ip) => assert!(
                tokio::net::TcpStream::connect((ip, port)).await.is_err(),
                "the dashboard answered on {ip}"
            ),
            None => eprintln!("no non-loopback address: only the bind address was checked"),
        }
        stop.cancel();
    }

    #[test]
    fn answers_only_loopback_hosts_and_gets() {
        let g = Graph::default();
        assert_eq!(
            handle(&get("/", "127.0.0.1:9"), 9, &g).status(),
            StatusCode::OK
        );
        assert_eq!(
            handle(&get("/", "localhost:9"), 9, &g).status(),
            StatusCode::OK
        );
        assert_eq!(
            handle(&get("/", "evil.example:9"), 9, &g).status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            handle(&get("/", "127.0.0.1:10"), 9, &g).status(),
            StatusCode::FORBIDDEN
        );
        let post = Request::post("/api/graph")
            .header(header::HOST, "127.0.0.1:9")
            .body(())
            .unwrap();
        assert_eq!(
            handle(&post, 9, &g).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            handle(&get("/x", "127.0.0.1:9"), 9, &g).status(),
            StatusCode::NOT_FOUND
        );
    }
}

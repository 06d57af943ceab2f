//! The size of the request handler's future. hyper stores it per
//! connection and it is moved into place for every request, so its bytes
//! show up as memcpy in the instruction profile (`benches/compare.sh
//! instr`); this test prints it and keeps it under a budget.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flinks_proxy::proxy::{self, ConnInfo};
use flinks_proxy::tokens::Token;
use flinks_proxy::{AppState, Config};
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes the handler future may take in a debug build (4,320 when set;
/// 4,776 once pooled routes added connection selection and the pooled
/// rejection path; a release build's is smaller). hyper moves it into place
/// for every request, and the server wraps it: each byte is copied several
/// times.
const BUDGET: usize = 5 * 1024;

#[tokio::test]
async fn the_handler_future_fits_its_budget() {
    let toml = r#"
[server]
listen = "127.0.0.1:0"
[credentials.c]
token_url = "http://127.0.0.1:9/token"
grant_type = "client_credentials"
client_id = "c"
client_secret = "s"
[routes.api]
path_prefix = "/"
upstream = "http://127.0.0.1:9"
credential = "c"
"#;
    let config = Config::parse(toml, Path::new("size.toml")).expect("config");
    let state = AppState::new(config).expect("state");
    state.generation.load().sources["c"]
        .install(Token::new("t", Duration::from_secs(3600)).expect("token"));
    let conn = Arc::new(ConnInfo::new(SocketAddr::from(([127, 0, 0, 1], 1)), false));

    // A real inbound request (an `Incoming` body only comes from hyper).
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut client = TcpStream::connect(l.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (inbound, _) = l.accept().await.expect("accept");
    let size = Arc::new(Mutex::new(None));
    let seen = Arc::clone(&size);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let fut = proxy::handle(Arc::clone(&state), Arc::clone(&conn), req);
        *seen.lock().expect("lock") = Some(std::mem::size_of_val(&fut));
        fut
    });
    tokio::spawn(
        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(inbound), svc),
    );
    client
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    client.read_to_end(&mut answer).await.expect("read");
    let size = size.lock().expect("lock").expect("the handler ran");
    println!("handler future: {size} bytes");
    assert!(
        size <= BUDGET,
        "the handler future is {size} bytes, budget {BUDGET}"
    );
}

mod support;
use support::*;

#[tokio::test]
async fn request_through_proxy_carries_the_token() {
    let sb = sandbox().await;
    let p = start_proxy(&config_toml(&sb, "")).await;
    let r = get(&proxy_url(&p, "/api/v1/accounts")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sb.token_requests(), 1);
}

#[test]
fn binary_starts_and_logs_listeners() {
    let dir = TempDir::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sb = rt.block_on(sandbox());
    let cfg = dir.write("proxy.toml", config_toml(&sb, ""));
    let p = ProxyProcess::start(&cfg, &[]);
    let r = rt.block_on(get(&p.url("/api/v1/accounts")));
    assert_eq!(r.status, 200, "{}", r.text());
}

//! The token source's unit tests: the retry backoff, and a refresh task
//! that panics.

use super::*;

#[test]
fn transient_backoff_doubles_to_a_minute() {
    let full = |n| backoff(true, n, 0.999_999);
    assert!(full(1) <= Duration::from_secs(1) && full(1) > Duration::from_millis(990));
    assert!(full(2) <= Duration::from_secs(2) && full(2) > Duration::from_millis(1990));
    assert!(full(7) <= BACKOFF_MAX && full(7) > Duration::from_secs(59));
    assert_eq!(backoff(true, 100, 0.999_999), full(7));
    assert_eq!(backoff(true, 1, 0.0), Duration::from_millis(500));
}

#[test]
fn rejected_backoff_is_five_minutes_with_jitter() {
    assert!(backoff(false, 1, 0.0) >= Duration::from_secs(150));
    assert!(backoff(false, 1, 0.999) <= BACKOFF_REJECTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_refresh_task_is_restarted_and_counted() {
    let sb = crate::sandbox::Sandbox::start(crate::sandbox::SandboxOptions::default())
        .await
        .unwrap();
    let toml = format!(
        "[credentials.c]\ntoken_url = \"{}\"\ngrant_type = \"client_credentials\"\n\
         client_id = \"demo-client\"\nclient_secret = \"demo-secret\"\n\
         [routes.r]\nupstream = \"{}\"\ncredential = \"c\"\n",
        sb.token_url(),
        sb.api_url()
    );
    let config = crate::config::Config::parse(&toml, std::path::Path::new("p.toml")).unwrap();
    let metrics = crate::ground::metrics::Metrics::new();
    let source = TokenSource::new(
        Arc::clone(&config.credentials["c"]),
        metrics.credential("c"),
    )
    .unwrap();
    source.panic_next.store(true, Ordering::SeqCst);
    let cancel = CancellationToken::new();
    source.spawn(cancel.clone(), None);
    // Until the restart, requests are told the task failed.
    let end = Instant::now() + Duration::from_secs(20);
    while source.usable().is_none() {
        assert!(Instant::now() < end, "no token after the panic");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(source.metrics.refresh_task_restarts.get(), 1);
    assert_eq!(sb.token_requests(), 1, "the panic came before the request");
    cancel.cancel();
    let task = source.take_task().unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
}

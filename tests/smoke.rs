mod support;
use support::*;

#[tokio::test]
async fn replay_smoke() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(&config(&up.url(), ""));
    let c = Client::new();
    let a = c.post_key(&proxy.url("/v1/orders"), "k1", "{}").await;
    let b = c.post_key(&proxy.url("/v1/orders"), "k1", "{}").await;
    assert_eq!(a.status, 201);
    assert_eq!(a.body, b.body);
    assert_eq!(b.replayed(), Some("true"));
    assert_eq!(up.executions(), 1);
}

//! Smoke test of the harness itself; the full suites live beside it.

use serde_json::json;

use crate::helpers::{SqliteFile, config, spawn_app};

#[tokio::test]
async fn a_message_is_counted() {
    let db = SqliteFile::new();
    let app = spawn_app(config("demo=secret", &db.url())).await;
    let (status, body) = app
        .post_events(
            "secret",
            &json!({"type": "message", "role": "user", "user_id": 1}),
        )
        .await;
    assert_eq!(status, 202);
    assert_eq!(body, json!({"accepted": 1, "duplicates": 0}));
    assert_eq!(
        app.sample(r#"bot_messages_total{bot="demo",role="user"}"#)
            .await,
        Some(1.0)
    );
    app.stop().await;
}

//! The runner's own tables stay bounded: each prunes what is older than
//! its retention, keeps what is still in use (open attempts, pending
//! uploads, the newest numbered event), and refusals keep only the start
//! of what a builder sent.

use hydra_queue_runner::record::{REJECTION_MAX, rejection};
use hydra_queue_runner::retention::{Pruned, prune_once};
use hydra_testkit::{BuilderSpec, Farm};

const LIMIT: std::time::Duration = std::time::Duration::from_secs(90);

async fn count(farm: &Farm, table: &str) -> i64 {
    sqlx::query_scalar(&format!("select count(*) from {table}"))
        .fetch_one(&farm.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn old_rows_go_and_what_is_in_use_stays() {
    let mut farm = Farm::start(|_| {}).await.unwrap();
    farm.add_builder(BuilderSpec::new("b")).await.unwrap();
    let ids = farm
        .submit(
            r#"with prelude; {
              one = mkDrv { name = "one"; script = "echo 1 > $out"; };
              two = mkDrv { name = "two"; script = "echo 2 > $out"; };
            }"#,
            &["one", "two"],
        )
        .await
        .unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    let pool = &farm.db.pool;
    farm.events_numbered(LIMIT).await.unwrap();
    let events = count(&farm, "hqr_events").await;
    assert!(events >= 4, "{events}");

    // Everything of the run made a hundred days old, but for build two's
    // attempt; one old and one new rejection, upload each.
    sqlx::query("update hqr_events set at_ms = at_ms - 100 * 86400000::bigint")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "update hqr_attempts set finished_at = now() - interval '100 days' where build = $1",
    )
    .bind(ids["one"])
    .execute(pool)
    .await
    .unwrap();
    let huge = "x".repeat(1 << 20);
    rejection(pool, "c", Some("b"), "a", "report", &huge)
        .await
        .unwrap();
    rejection(pool, "c", Some("b"), "a", "report", "old")
        .await
        .unwrap();
    sqlx::query("update hqr_rejections set at = now() - interval '100 days' where reason = 'old'")
        .execute(pool)
        .await
        .unwrap();
    let kept: i64 =
        sqlx::query_scalar("select max(octet_length(reason))::bigint from hqr_rejections")
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(
        kept as usize <= REJECTION_MAX + 8,
        "a reason of {kept} bytes kept"
    );
    for (item, done) in [
        ("/nix/store/old", Some("now() - interval '100 days'")),
        ("/nix/store/new", Some("now()")),
        ("/nix/store/pending", None),
    ] {
        sqlx::query(&format!(
            "insert into hqr_uploads (destination, kind, item, done_at) values ('file:///c', 'path', $1, {})",
            done.unwrap_or("null")
        ))
        .bind(item)
        .execute(pool)
        .await
        .unwrap();
    }

    let pruned = prune_once(&farm.runner().shared).await.unwrap();
    assert_eq!(
        pruned,
        Pruned {
            events: events as u64 - 1,
            attempts: 1,
            rejections: 1,
            uploads: 1,
        }
    );
    assert_eq!(
        count(&farm, "hqr_events").await,
        1,
        "the newest numbered event stays"
    );
    assert_eq!(count(&farm, "hqr_attempts").await, 1);
    let uploads: Vec<String> = sqlx::query_scalar("select item from hqr_uploads order by item")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(uploads, ["/nix/store/new", "/nix/store/pending"]);
    assert_eq!(
        prune_once(&farm.runner().shared).await.unwrap(),
        Pruned::default()
    );

    // Numbering goes on from the event kept: a new build's events follow.
    let last: i64 = sqlx::query_scalar("select max(seq) from hqr_events")
        .fetch_one(pool)
        .await
        .unwrap();
    let more = farm
        .submit(
            r#"with prelude; { three = mkDrv { name = "three"; script = "echo 3 > $out"; }; }"#,
            &["three"],
        )
        .await
        .unwrap();
    farm.wait_finished(more.values().copied(), LIMIT)
        .await
        .unwrap();
    farm.events_numbered(LIMIT).await.unwrap();
    let lowest_new: i64 = sqlx::query_scalar("select min(seq) from hqr_events where seq > $1")
        .bind(last)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(lowest_new, last + 1);
}

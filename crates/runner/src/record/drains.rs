//! Drained machines (`hqr_drained_machines`), kept across restarts.

use sqlx::PgConnection;

/// Records `name` as drained, or no longer drained.
pub async fn set_machine_drained(
    db: &mut PgConnection,
    name: &str,
    drained: bool,
) -> Result<(), sqlx::Error> {
    let sql = if drained {
        "insert into hqr_drained_machines (name) values ($1) on conflict do nothing"
    } else {
        "delete from hqr_drained_machines where name = $1"
    };
    sqlx::query(sql).bind(name).execute(db).await.map(|_| ())
}

/// The machines drained now.
pub async fn drained_machines(db: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("select name from hqr_drained_machines order by name")
        .fetch_all(db)
        .await
}

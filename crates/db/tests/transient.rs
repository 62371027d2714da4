//! Which database errors are retried: a real deadlock is, a real
//! constraint violation is not.

use hydra_testkit::TestDb;

#[tokio::test]
async fn a_deadlock_is_transient_and_a_constraint_violation_is_not() {
    let db = TestDb::new().await;
    sqlx::raw_sql(
        "create table t (id int primary key, v int); insert into t values (1, 0), (2, 0);",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut ta = db.pool.begin().await.unwrap();
    let mut tb = db.pool.begin().await.unwrap();
    sqlx::query("update t set v = 1 where id = 1")
        .execute(&mut *ta)
        .await
        .unwrap();
    sqlx::query("update t set v = 1 where id = 2")
        .execute(&mut *tb)
        .await
        .unwrap();
    // Each now waits for the other's row: PostgreSQL aborts one of them,
    // whose rollback lets the other go on.
    let second = |mut tx: sqlx::Transaction<'static, sqlx::Postgres>, id: i32| async move {
        let r = sqlx::query("update t set v = 2 where id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await;
        match r {
            Ok(_) => tx.commit().await,
            Err(e) => {
                tx.rollback().await.ok();
                Err(e)
            }
        }
    };
    let (ra, rb) = tokio::join!(second(ta, 2), second(tb, 1));
    let err = ra.err().or(rb.err()).expect("one side deadlocks");
    assert!(hydra_db::is_transient(&err), "{err}");

    let dup = sqlx::query("insert into t values (1, 0)")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(!hydra_db::is_transient(&dup), "{dup}");
}

/// What outside input can make PostgreSQL refuse is a data error (it ends
/// the step, not the runner); a broken query or a lost server is fatal.
#[tokio::test]
async fn refused_data_is_a_data_error_and_a_broken_query_is_fatal() {
    use hydra_db::{Fault, classify};
    let db = TestDb::new().await;
    sqlx::raw_sql(
        "create table p (id int primary key);
         create table c (p int references p(id), n int not null, t text, check (n >= 0));",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let refused = [
        ("a NUL byte", "insert into c values (null, 0, $1)", "a\0b"),
        ("a foreign key", "insert into c values (7, 0, $1)", ""),
        ("a check", "insert into c values (null, -1, $1)", ""),
        ("a not-null", "insert into c values (null, null, $1)", ""),
        (
            "out of range",
            "insert into c values (null, 99999999999, $1)",
            "",
        ),
    ];
    for (what, sql, text) in refused {
        let err = sqlx::query(sql)
            .bind(text)
            .execute(&db.pool)
            .await
            .unwrap_err();
        assert_eq!(classify(&err), Fault::Data, "{what}: {err}");
        assert!(hydra_db::is_data_error(&err));
    }
    let broken = sqlx::query("select * from no_such_table")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert_eq!(classify(&broken), Fault::Fatal, "{broken}");
    assert_eq!(classify(&sqlx::Error::PoolTimedOut), Fault::Fatal);
}

//! The schema: applied by the project's migrations, Hydra-compatible.

use hydra_db::{MigrateError, migrate};
use hydra_testkit::TestDb;
use sqlx::postgres::PgListener;

#[tokio::test]
async fn applies_to_an_empty_database_and_again_as_a_no_op() {
    let db = TestDb::empty().await;
    let first = migrate(&db.pool).await.unwrap();
    assert_eq!(first.applied, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    let second = migrate(&db.pool).await.unwrap();
    assert!(
        second.applied.is_empty(),
        "second run applied {:?}",
        second.applied
    );
    assert_eq!(second.current, 10);
}

async fn columns(db: &TestDb, table: &str) -> Vec<(String, bool)> {
    sqlx::query_as(
        "select column_name::text, is_nullable = 'YES' from information_schema.columns
         where table_name = lower($1) order by column_name",
    )
    .bind(table)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn has_the_hydra_columns_the_runner_uses() {
    let db = TestDb::new().await;
    let expected: &[(&str, &[&str])] = &[
        (
            "Builds",
            &[
                "id",
                "finished",
                "timestamp",
                "jobset_id",
                "job",
                "drvpath",
                "system",
                "maxsilent",
                "timeout",
                "priority",
                "globalpriority",
                "starttime",
                "stoptime",
                "iscachedbuild",
                "buildstatus",
                "size",
                "closuresize",
                "releasename",
                "notificationpendingsince",
            ],
        ),
        (
            "BuildSteps",
            &[
                "build",
                "stepnr",
                "type",
                "drvpath",
                "busy",
                "status",
                "errormsg",
                "starttime",
                "stoptime",
                "machine",
                "system",
                "propagatedfrom",
                "overhead",
                "timesbuilt",
                "isnondeterministic",
                "resolveddrvpath",
            ],
        ),
        ("BuildOutputs", &["build", "name", "path"]),
        ("BuildStepOutputs", &["build", "stepnr", "name", "path"]),
        ("Jobsets", &["id", "project", "name", "schedulingshares"]),
        (
            "BuildProducts",
            &[
                "build",
                "productnr",
                "type",
                "subtype",
                "filesize",
                "sha256hash",
                "path",
                "name",
                "defaultpath",
            ],
        ),
        (
            "BuildMetrics",
            &[
                "build",
                "name",
                "unit",
                "value",
                "project",
                "jobset",
                "job",
                "timestamp",
            ],
        ),
        ("FailedPaths", &["path"]),
    ];
    for (table, cols) in expected {
        let have: Vec<String> = columns(&db, table)
            .await
            .into_iter()
            .map(|(c, _)| c)
            .collect();
        for col in *cols {
            assert!(
                have.iter().any(|h| h == col),
                "{table} lacks {col}; has {have:?}"
            );
        }
    }
    // CA outputs are not known before the build.
    for table in ["BuildOutputs", "BuildStepOutputs"] {
        let path_nullable = columns(&db, table)
            .await
            .into_iter()
            .find(|(c, _)| c == "path")
            .unwrap()
            .1;
        assert!(
            path_nullable,
            "{table}.path must be nullable for CA outputs"
        );
    }
    let version: i32 = sqlx::query_scalar("select version from SchemaVersion")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(version, 87);
}

#[tokio::test]
async fn scheduling_shares_must_be_positive() {
    let db = TestDb::new().await;
    seed_build(&db).await;
    let err = sqlx::query("update Jobsets set schedulingShares = 0")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("jobsets_schedulingshares_nonzero_check"),
        "{err}"
    );
}

/// A user, project, jobset and one queued build.
async fn seed_build(db: &TestDb) -> i32 {
    hydra_testkit::hydra_jobset(&db.pool, "p", "j")
        .await
        .unwrap();
    sqlx::query_scalar(
        "insert into Builds (finished, timestamp, jobset_id, job, drvPath, system)
         values (0, 1, (select id from Jobsets), 'job', '/nix/store/00000000000000000000000000000000-a.drv', 'x86_64-linux')
         returning id",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn triggers_send_the_notifications_the_runner_listens_to() {
    let db = TestDb::new().await;
    seed_build(&db).await;
    let mut listener = PgListener::connect(&db.url).await.unwrap();
    listener
        .listen_all([
            "builds_bumped",
            "builds_cancelled",
            "builds_restarted",
            "builds_deleted",
            "jobset_shares_changed",
        ])
        .await
        .unwrap();
    let steps: &[(&str, &str)] = &[
        ("update Builds set globalPriority = 10", "builds_bumped"),
        (
            "update Builds set finished = 1, buildStatus = 4, startTime = 1, stopTime = 1",
            "builds_cancelled",
        ),
        (
            "update Builds set finished = 0, buildStatus = null",
            "builds_restarted",
        ),
        (
            "update Jobsets set schedulingShares = 5",
            "jobset_shares_changed",
        ),
        ("delete from Builds", "builds_deleted"),
    ];
    for (sql, channel) in steps {
        sqlx::query(sql).execute(&db.pool).await.unwrap();
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(n.channel(), *channel, "after {sql}");
    }
}

#[tokio::test]
async fn refuses_a_database_migrated_by_a_newer_runner() {
    let db = TestDb::new().await;
    sqlx::query(
        "insert into _sqlx_migrations (version, description, success, checksum, execution_time)
         values (9999, 'from the future', true, '\\x00', 0)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let err = migrate(&db.pool).await.unwrap_err();
    assert!(matches!(err, MigrateError::NewerSchema(9999)), "{err:?}");
    assert!(
        err.to_string().contains("newer hydra-queue-runner"),
        "{err}"
    );
}

#[tokio::test]
async fn refuses_a_newer_hydra_schema() {
    let db = TestDb::empty().await;
    sqlx::raw_sql("create table SchemaVersion (version integer not null); insert into SchemaVersion values (88)")
        .execute(&db.pool)
        .await
        .unwrap();
    let err = migrate(&db.pool).await.unwrap_err();
    assert!(
        matches!(err, MigrateError::NewerHydraSchema { found: 88 }),
        "{err:?}"
    );
}

#[tokio::test]
async fn applies_on_top_of_a_database_hydra_created_and_keeps_its_data() {
    let db = TestDb::empty().await;
    sqlx::raw_sql(hydra_testkit::pg::HYDRA_SCHEMA)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::raw_sql(
        "insert into Users (userName, emailAddress, password) values ('alice', 'a@example.org', 'x');
         insert into Projects (name, displayName, owner) values ('p', 'P', 'alice');
         insert into Jobsets (name, project, nixExprInput, nixExprPath, emailOverride) values ('j', 'p', 'src', 'release.nix', '');
         insert into Jobsets (name, project, type, flake, emailOverride) values ('f', 'p', 1, 'github:x/y', '');
         insert into Builds (finished, timestamp, jobset_id, job, drvPath, system, buildStatus, startTime, stopTime)
           values (1, 1700000000, 1, 'hello', '/nix/store/00000000000000000000000000000000-hello.drv', 'x86_64-linux', 0, 1700000001, 1700000002);
         insert into BuildSteps (build, stepnr, type, drvPath, busy, status) values (1, 1, 0, '/nix/store/00000000000000000000000000000000-hello.drv', 0, 0);
         insert into StarredJobs values ('alice', 'p', 'j', 'hello');",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let report = migrate(&db.pool).await.unwrap();
    assert_eq!(report.applied, vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    let (status, drv): (i32, String) =
        sqlx::query_as("select buildStatus, drvPath from Builds where id = 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(
        (status, drv.as_str()),
        (0, "/nix/store/00000000000000000000000000000000-hello.drv")
    );
    let starred: i64 = sqlx::query_scalar("select count(*) from StarredJobs")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(starred, 1, "Hydra's other tables are untouched");
    let flake: Option<String> = sqlx::query_scalar("select flake from Jobsets where name = 'f'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        flake.as_deref(),
        Some("github:x/y"),
        "a flake jobset is left as it is"
    );
    let versions: Vec<i32> = sqlx::query_scalar("select version from SchemaVersion")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(versions, vec![87]);
    // Hydra's own constraint (emailOverride without a default) still holds.
    let err = sqlx::query("insert into Jobsets (name, project, nixExprInput, nixExprPath, emailOverride) values ('k', 'p', 'a', 'b', null)")
        .execute(&db.pool)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("emailoverride"), "{err}");
}

/// Everything PostgreSQL enforces or runs on one table, as comparable text.
async fn table_shape(db: &TestDb, table: &str) -> Vec<String> {
    let mut shape: Vec<String> = Vec::new();
    let columns: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "select column_name::text, data_type::text, is_nullable::text, column_default::text
           from information_schema.columns where table_name = lower($1)",
    )
    .bind(table)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    shape.extend(columns.into_iter().map(|(name, ty, null, default)| {
        format!("column {name} {ty} nullable={null} default={default:?}")
    }));
    let constraints: Vec<(String, String)> = sqlx::query_as(
        "select contype::text, pg_get_constraintdef(oid) from pg_constraint where conrelid = lower($1)::regclass",
    )
    .bind(table)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    shape.extend(
        constraints
            .into_iter()
            .map(|(ty, def)| format!("constraint {ty} {def}")),
    );
    let indexes: Vec<String> =
        sqlx::query_scalar("select indexdef from pg_indexes where tablename = lower($1)")
            .bind(table)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    shape.extend(indexes.into_iter().map(|d| format!("index {d}")));
    let triggers: Vec<String> = sqlx::query_scalar(
        "select pg_get_triggerdef(oid) from pg_trigger where tgrelid = lower($1)::regclass and not tgisinternal",
    )
    .bind(table)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    shape.extend(triggers.into_iter().map(|d| format!("trigger {d}")));
    let rules: Vec<String> =
        sqlx::query_scalar("select definition from pg_rules where tablename = lower($1)")
            .bind(table)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    shape.extend(rules.into_iter().map(|d| format!("rule {d}")));
    shape.sort();
    shape
}

/// The project creates Hydra's tables exactly as Hydra constrains them:
/// every column, default, constraint, index, trigger and rule of each
/// Hydra table the project's migrations create is the same as on a
/// database made by Hydra's schema (then migrated), so that nothing the
/// suite does passes here and fails beside a real Hydra.
#[tokio::test]
async fn hydras_tables_are_created_as_hydra_constrains_them() {
    let ours = TestDb::new().await;
    let hydras = TestDb::hydra().await;
    let tables: Vec<String> = sqlx::query_scalar(
        "select tablename::text from pg_tables where schemaname = 'public'
            and tablename not like 'hqr\\_%' and tablename != '_sqlx_migrations' order by 1",
    )
    .fetch_all(&ours.pool)
    .await
    .unwrap();
    assert!(tables.len() >= 16, "{tables:?}");
    let mut differences = Vec::new();
    for table in &tables {
        let (a, b) = (
            table_shape(&ours, table).await,
            table_shape(&hydras, table).await,
        );
        assert!(!b.is_empty(), "Hydra has no table {table}");
        for line in a.iter().filter(|l| !b.contains(l)) {
            differences.push(format!("{table}: only ours: {line}"));
        }
        for line in b.iter().filter(|l| !a.contains(l)) {
            differences.push(format!("{table}: only Hydra's: {line}"));
        }
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

#[tokio::test]
async fn build_changes_are_recorded_for_the_runner_per_build() {
    let db = TestDb::new().await;
    hydra_testkit::hydra_jobset(&db.pool, "p", "j")
        .await
        .unwrap();
    sqlx::raw_sql(
        "insert into Builds (id, finished, timestamp, jobset_id, job, drvPath, system)
           select n, 0, 0, (select id from Jobsets), 'job', '/nix/store/x.drv', 'x86_64-linux' from generate_series(1, 4) n;
         update Builds set globalPriority = 10 where id = 1;
         update Builds set finished = 1, buildStatus = 4, startTime = 1, stopTime = 1 where id = 2;
         update Builds set finished = 1, buildStatus = 0, startTime = 1, stopTime = 1 where id = 3;
         update Builds set finished = 0 where id = 3;
         delete from Builds where id = 4;",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let changes: Vec<(i32, String)> =
        sqlx::query_as("select build, kind from hqr_build_changes order by seq")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let expected = [
        (1, "bumped"),
        (2, "cancelled"),
        (3, "restarted"),
        (4, "deleted"),
    ];
    assert_eq!(
        changes,
        expected.map(|(b, k)| (b, k.to_owned())).to_vec(),
        "a build finished by the runner itself (3, status 0) is not a change"
    );
}

//! `hydra-queue-runner migrate` as an operator runs it.

use hydra_testkit::TestDb;

fn runner() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_hydra-queue-runner"))
}

#[tokio::test]
async fn migrate_applies_then_reports_current() {
    let db = TestDb::empty().await;
    let first = runner()
        .args(["migrate", "--database-url", &db.url])
        .output()
        .unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(
        String::from_utf8_lossy(&first.stdout)
            .contains("applied migrations [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]")
    );
    let second = runner()
        .arg("migrate")
        .env("HYDRA_DATABASE_URL", &db.url)
        .output()
        .unwrap();
    assert!(second.status.success());
    assert!(String::from_utf8_lossy(&second.stdout).contains("schema is current (migration 10)"));
}

#[test]
fn migrate_without_a_database_says_how_to_give_one() {
    let out = runner()
        .arg("migrate")
        .env_remove("HYDRA_DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--database-url"));
}

#[test]
fn migrate_against_an_unreachable_server_fails_clearly() {
    let out = runner()
        .args([
            "migrate",
            "--database-url",
            "postgres://nobody@127.0.0.1:1/none",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot connect to the database"), "{err}");
}

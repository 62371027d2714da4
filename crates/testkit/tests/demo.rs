//! The README's demo runs end to end and says what it did.

#[test]
fn the_demo_builds_the_jobset_across_two_builders() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hydra-demo"))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[8/8 builds]"), "{stdout}");
    assert!(stdout.contains("ca-app        succeeded"), "{stdout}");
    assert!(
        stdout.contains("on builder-a") && stdout.contains("on builder-b"),
        "{stdout}"
    );
    let docs: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" docs.drv "))
        .collect();
    assert!(
        !docs.is_empty()
            && docs
                .iter()
                .all(|l| l.ends_with("on builder-b") || l.contains("on builder-b:")),
        "big-parallel runs only on builder-b: {docs:?}"
    );
    assert!(
        stdout.contains("needs-broken  dependency failed"),
        "{stdout}"
    );
    assert!(stdout.contains("report-1.0"), "{stdout}");
    assert!(stdout.contains("Hello, world"), "{stdout}");
}

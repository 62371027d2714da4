//! The README's demo runs end to end and says what it did.

#[test]
fn the_demo_builds_the_jobset_across_two_builders() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hydra-demo"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("[5/5] report"), "{stdout}");
    assert!(
        stdout.contains("on builder-a") && stdout.contains("on builder-b"),
        "{stdout}"
    );
    assert!(stdout.contains("5 builds wait in PostgreSQL"), "{stdout}");
    assert!(stdout.contains("greeting from a CA derivation"), "{stdout}");
}

//! The NixOS modules, evaluated (without nixpkgs: `tests/nixos/eval-module.nix`
//! stands in for the parts of `lib` and `pkgs` they use): beside NixOS's
//! own services.hydra the runner takes the place of Hydra's queue runner,
//! on Hydra's database, user and HYDRA_DATA, and its nix-daemon trusts it.

use std::path::Path;

fn evaluate(module: &str, settings: &str, hydra: Option<&str>) -> serde_json::Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut cmd = std::process::Command::new("nix-instantiate");
    cmd.args(["--eval", "--strict", "--json"])
        .arg(root.join("tests/nixos/eval-module.nix"))
        .arg("--arg")
        .arg("module")
        .arg(root.join(module))
        .args(["--arg", "settings", settings]);
    if let Some(h) = hydra {
        cmd.args(["--arg", "hydra", h]);
    }
    let out = cmd.output().expect("nix-instantiate is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn beside_services_hydra_the_runner_takes_the_place_of_hydras_queue_runner() {
    let config = evaluate(
        "nixos/queue-runner.nix",
        r#"{ enable = true; package = "/pkg"; }"#,
        Some(r#"{ enable = true; baseDir = "/srv/hydra"; }"#),
    );
    assert_eq!(
        config["nix"]["settings"]["trusted-users"],
        serde_json::json!(["hydra-queue-runner"]),
        "the nix-daemon imports the unsigned outputs it uploads"
    );
    assert_eq!(
        config["systemd"]["services"]["hydra-queue-runner"]["enable"],
        serde_json::json!({"_type": "override", "priority": 50, "content": false}),
        "Hydra's own queue runner is forced off"
    );
    let unit = &config["systemd"]["services"]["hydra-queue-runner-rs"];
    assert_eq!(unit["serviceConfig"]["User"], "hydra-queue-runner");
    assert_eq!(unit["environment"]["HYDRA_DATA"], "/srv/hydra");
    assert_eq!(
        unit["environment"]["HYDRA_DATABASE_URL"],
        "postgres:///hydra?host=/run/postgresql&user=hydra"
    );
    assert_eq!(
        unit["serviceConfig"]["ReadWritePaths"],
        serde_json::json!(["/srv/hydra/build-logs"])
    );
    assert!(
        unit["serviceConfig"]["ExecStart"]
            .as_str()
            .unwrap()
            .contains(r#""hydra_data":"/srv/hydra""#)
    );
    assert_eq!(
        config["services"]["hydra"]["extraConfig"],
        "queue_runner_endpoint = http://127.0.0.1:7071\n",
        "hydra-web asks this runner for its status"
    );
    assert!(
        config.get("users").is_none(),
        "services.hydra makes the hydra-queue-runner user"
    );
}

#[test]
fn alone_the_runner_has_a_user_of_its_own_which_its_daemon_trusts() {
    let config = evaluate(
        "nixos/queue-runner.nix",
        r#"{ enable = true; package = "/pkg"; }"#,
        None,
    );
    assert_eq!(
        config["users"]["users"]["hydra-queue-runner"]["isSystemUser"],
        true
    );
    assert_eq!(
        config["nix"]["settings"]["trusted-users"],
        serde_json::json!(["hydra-queue-runner"])
    );
    assert!(
        config["systemd"]["services"]
            .get("hydra-queue-runner")
            .is_none()
    );
}

#[test]
fn the_runner_module_will_not_serve_builders_beyond_loopback_unauthenticated() {
    let open = evaluate(
        "nixos/queue-runner.nix",
        r#"{ enable = true; package = "/pkg"; }"#,
        None,
    );
    let checks = open["assertions"].as_array().unwrap();
    assert_eq!(checks[0]["assertion"], false, "0.0.0.0 without tokens");
    let message = checks[0]["message"].as_str().unwrap();
    assert!(message.contains("set tokensDir"), "{message}");
    assert_eq!(
        checks[1]["assertion"], true,
        "the client API stays on loopback"
    );
    assert_eq!(
        open["environment"]["variables"]["HYDRA_QUEUE_RUNNER_URL"],
        "http://127.0.0.1:7072"
    );

    let closed = evaluate(
        "nixos/queue-runner.nix",
        r#"{ enable = true; package = "/pkg"; tokensDir = "/run/keys/builders"; clientListen = "0.0.0.0:7072"; clientTokensDir = "/run/keys/clients"; }"#,
        None,
    );
    let checks = closed["assertions"].as_array().unwrap();
    assert!(checks.iter().all(|c| c["assertion"] == true), "{checks:?}");
    let exec = closed["systemd"]["services"]["hydra-queue-runner-rs"]["serviceConfig"]["ExecStart"]
        .as_str()
        .unwrap();
    assert!(
        exec.contains(r#""client_tokens_dir":"/run/keys/clients""#)
            && exec.contains(r#""builder_tokens_dir":"/run/keys/builders""#),
        "{exec}"
    );
}

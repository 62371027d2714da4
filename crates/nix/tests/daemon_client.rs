//! The worker-protocol client against a real nix-daemon over a private store.

use hydra_nix::daemon::{
    BuildMode, BuildStatus, DaemonClient, DaemonError, LogLine, PathInfo, Realisation,
};
use hydra_nix::nar;
use hydra_nix::store_path::ContentAddressMethod;
use hydra_nix::{Derivation, StoreDir};
use hydra_testkit::NixStore;
use hydra_testkit::current_nix::NixVersion;

/// The path info of `src` added to the store by content (`nix-store --add`-like).
fn content_addressed_info(src: &std::path::Path, name: &str) -> PathInfo {
    let (hash, size) = nar::hash_path(src).unwrap();
    let dir = StoreDir::default();
    let path = dir.make_fixed_output_path(ContentAddressMethod::Recursive, &hash, name, &[], false);
    PathInfo {
        path: dir.display(&path),
        deriver: None,
        ca: Some(format!("fixed:r:{}", hash.to_prefixed_base32())),
        nar_hash: hash,
        references: vec![],
        registration_time: 0,
        nar_size: size,
        ultimate: false,
        signatures: vec![],
    }
}

/// A request after an error still gets an answer on the same connection.
async fn assert_connection_usable(client: &mut DaemonClient) {
    let missing = "/nix/store/00000000000000000000000000000000-x";
    assert!(!client.is_valid_path(missing).await.unwrap());
}

async fn connect(store: &NixStore) -> DaemonClient {
    DaemonClient::connect(store.socket())
        .await
        .expect("handshake with nix-daemon")
}

/// The newest protocol both sides know: 1.34 with Nix 2.8 (which says
/// nothing of trust), 1.38 with Nix 2.26 (the feature exchange, then its
/// version and its trust in root).
#[tokio::test]
async fn handshake_negotiates_the_newest_protocol_both_sides_know() {
    let store = NixStore::start().unwrap();
    let client = connect(&store).await;
    match store.version() {
        NixVersion::Host => {
            assert_eq!(client.protocol_minor(), 34);
            assert_eq!(client.daemon_version(), Some("2.8.0"));
            assert_eq!(client.trusted(), None);
        }
        NixVersion::Current => {
            assert_eq!(client.protocol_minor(), 38);
            assert_eq!(client.daemon_version(), Some("2.26.3"));
            assert_eq!(client.trusted(), Some(true), "root is trusted");
            assert!(client.features().is_empty());
        }
    }
}

/// On the current Nix, builds run sandboxed as a build user (never
/// silently unsandboxed). The build result is read at 1.37's layout (its
/// CPU times are absent here: Nix measures them only with cgroups).
#[tokio::test]
async fn on_the_current_nix_a_build_is_sandboxed_as_a_build_user() {
    let store = NixStore::start().unwrap();
    if store.version() != NixVersion::Current {
        return; // the host's Nix runs tests unsandboxed by design
    }
    let paths = store
        .instantiate(
            r#"with prelude; {
                jailed = mkDrv {
                    name = "jailed";
                    script = "test ! -e /var && test ! -e /root && test $(id -u) -ne 0 && echo sandboxed > $out";
                };
            }"#,
            &["jailed"],
        )
        .await
        .unwrap();
    let dir = StoreDir::default();
    let drv = Derivation::parse(
        &dir,
        &store.read_store_file(&paths["jailed"]).await.unwrap(),
    )
    .unwrap();
    let mut client = connect(&store).await;
    let result = client
        .build_derivation(&paths["jailed"], &drv, BuildMode::Normal, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(result.status, BuildStatus::Built, "{}", result.error_msg);
    assert!(result.stop_time >= result.start_time);
}

/// A directory tree imported as a NAR reads back byte for byte, with the
/// hash Nix itself computes.
#[tokio::test]
async fn imported_nar_reads_back_identically_with_nixs_hash() {
    let store = NixStore::start().unwrap();
    let mut client = connect(&store).await;
    let src = tempfile::tempdir().unwrap();
    let root = src.path().join("tree");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("a.txt"), "hello\n").unwrap();
    std::fs::write(root.join("sub/b"), vec![7u8; 100_000]).unwrap();
    std::os::unix::fs::symlink("a.txt", root.join("link")).unwrap();
    let exe = root.join("run.sh");
    std::fs::write(&exe, "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let nar_bytes = nar::nar_bytes(&root).unwrap();
    let (hash, size) = nar::hash_path(&root).unwrap();
    assert_eq!(size, nar_bytes.len() as u64);
    let dir = StoreDir::default();
    let path =
        dir.make_fixed_output_path(ContentAddressMethod::Recursive, &hash, "tree", &[], false);
    let info = PathInfo {
        path: dir.display(&path),
        deriver: None,
        nar_hash: hash.clone(),
        references: vec![],
        registration_time: 0,
        nar_size: size,
        ultimate: false,
        signatures: vec![],
        ca: Some(format!("fixed:r:{}", hash.to_prefixed_base32())),
    };
    client
        .add_to_store_nar(&info, &mut nar_bytes.as_slice(), false, true)
        .await
        .unwrap();

    assert!(client.is_valid_path(&info.path).await.unwrap());
    let got = client.query_path_info(&info.path).await.unwrap().unwrap();
    assert_eq!((got.nar_hash.clone(), got.nar_size), (hash.clone(), size));
    let nix_hash = store
        .run("nix-store", &["-q", "--hash", &info.path])
        .await
        .unwrap();
    assert_eq!(
        nix_hash.trim(),
        hash.to_prefixed_base32(),
        "our NAR hash equals nix-store -q --hash"
    );

    let mut exported = Vec::new();
    client
        .nar_from_path(&info.path, &mut exported)
        .await
        .unwrap();
    assert_eq!(exported, nar_bytes);
    let unpacked = src.path().join("unpacked");
    nar::unpack(&exported, &unpacked).unwrap();
    assert_eq!(
        std::fs::read(unpacked.join("sub/b")).unwrap(),
        vec![7u8; 100_000]
    );
}

#[tokio::test]
async fn a_nar_with_the_wrong_hash_is_refused_and_the_connection_survives() {
    let store = NixStore::start().unwrap();
    let mut client = connect(&store).await;
    let src = tempfile::tempdir().unwrap();
    let file = src.path().join("f");
    std::fs::write(&file, "content").unwrap();
    let bytes = nar::nar_bytes(&file).unwrap();
    let info = PathInfo {
        nar_hash: hydra_nix::Hash::sha256(b"something else"),
        ..content_addressed_info(&file, "f")
    };
    let err = client
        .add_to_store_nar(&info, &mut bytes.as_slice(), false, true)
        .await
        .unwrap_err();
    let msg = err
        .nix_message()
        .unwrap_or_else(|| panic!("expected a Nix error, got {err}"));
    assert!(msg.contains("hash mismatch"), "{msg}");
    assert!(
        !client.is_valid_path(&info.path).await.unwrap(),
        "nothing was imported"
    );
}

#[tokio::test]
async fn daemon_errors_come_back_typed_with_nixs_message() {
    let store = NixStore::start().unwrap();
    let mut client = connect(&store).await;
    let missing = "/nix/store/00000000000000000000000000000000-missing.drv!out".to_owned();
    let err = client
        .build_paths(&[missing], BuildMode::Normal, &mut |_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, DaemonError::Nix { .. }), "{err:?}");
    assert!(err.nix_message().unwrap().contains("missing.drv"), "{err}");
    // The connection is still usable after the daemon reported an error.
    assert_connection_usable(&mut client).await;
}

#[tokio::test]
async fn a_malformed_path_is_refused_before_it_reaches_the_daemon() {
    let store = NixStore::start().unwrap();
    let mut client = connect(&store).await;
    let err = client
        .query_path_info("/not/a/store/path")
        .await
        .unwrap_err();
    assert!(matches!(err, DaemonError::InvalidPath(_)), "{err:?}");
    // Nix 2.8 would have closed the connection; ours is still open.
    assert_connection_usable(&mut client).await;
}

#[tokio::test]
async fn many_temporary_roots_sent_ahead_of_their_answers_hold_through_a_gc() {
    let store = NixStore::start().unwrap();
    let count = hydra_nix::daemon::PIPELINED * 2 + 3;
    let names: Vec<String> = (0..=count).map(|i| format!("d{i}")).collect();
    let expr: String = names
        .iter()
        .map(|n| format!("{n} = mkDrv {{ name = \"{n}\"; script = \"echo > $out\"; }};\n"))
        .collect();
    let attrs: Vec<&str> = names.iter().map(String::as_str).collect();
    let paths = store
        .instantiate(&format!("with prelude; {{ {expr} }}"), &attrs)
        .await
        .unwrap();
    let (last, rooted) = attrs.split_last().unwrap();
    let rooted: Vec<String> = rooted.iter().map(|a| paths[*a].clone()).collect();
    let mut client = connect(&store).await;
    client.add_temp_roots(&rooted).await.unwrap();
    assert_eq!(client.temp_roots() as usize, rooted.len());

    store.run("nix-store", &["--gc"]).await.unwrap();
    let valid = client.query_valid_paths(&rooted).await.unwrap();
    assert_eq!(
        valid.len(),
        rooted.len(),
        "every rooted path outlived the GC"
    );
    assert!(
        !client.is_valid_path(&paths[*last]).await.unwrap(),
        "the one left unrooted went: the GC did run"
    );
    assert_connection_usable(&mut client).await;
}

/// Path infos asked a batch at a time answer as one question a path
/// would, in order, `None` for a path that is not valid; answers far
/// larger than the requests (a `.drv` with hundreds of references, asked
/// hundreds of times) do not stall the connection.
#[tokio::test]
async fn path_infos_asked_ahead_of_their_answers_match_one_at_a_time() {
    let store = NixStore::start().unwrap();
    let count = 300;
    let names: Vec<String> = (0..count).map(|i| format!("d{i}")).collect();
    let mut expr: String = names
        .iter()
        .map(|n| format!("{n} = mkDrv {{ name = \"{n}\"; script = \"echo > $out\"; }};\n"))
        .collect();
    let all: Vec<String> = names.iter().map(|n| format!("${{{n}}}")).collect();
    expr.push_str(&format!(
        "wide = mkDrv {{ name = \"wide\"; script = \"echo {} > $out\"; }};\n",
        all.join(" ")
    ));
    let mut attrs: Vec<&str> = names.iter().map(String::as_str).collect();
    attrs.push("wide");
    let paths = store
        .instantiate(&format!("with prelude; rec {{ {expr} }}"), &attrs)
        .await
        .unwrap();
    let wide = paths["wide"].clone();
    let missing = "/nix/store/00000000000000000000000000000000-missing".to_owned();
    let mut asked = Vec::new();
    for i in 0..hydra_nix::daemon::PIPELINED * 2 + 3 {
        asked.push(if i % 50 == 7 {
            missing.clone()
        } else {
            wide.clone()
        });
        asked.push(paths[&names[i % count]].clone());
    }
    let mut client = connect(&store).await;
    let batched = client.query_path_infos(&asked).await.unwrap();
    assert_eq!(batched.len(), asked.len());
    let wide_info = client.query_path_info(&wide).await.unwrap().unwrap();
    assert!(
        wide_info.references.len() >= count,
        "the wide .drv names every input"
    );
    for (path, got) in asked.iter().zip(&batched) {
        let one = client.query_path_info(path).await.unwrap();
        assert_eq!(got.as_ref().map(|i| &i.path), one.as_ref().map(|i| &i.path));
        assert_eq!(
            got.as_ref()
                .map(|i| (&i.references, i.nar_size, &i.nar_hash)),
            one.as_ref()
                .map(|i| (&i.references, i.nar_size, &i.nar_hash)),
            "{path}"
        );
    }
    assert!(
        batched.iter().any(Option::is_none),
        "the missing path answered None"
    );

    // The closure, asked a level at a time, is the closure one path at a time.
    let closure = client
        .query_closure(std::slice::from_ref(&wide))
        .await
        .unwrap();
    let mut expected = std::collections::BTreeSet::new();
    let mut todo = vec![wide.clone()];
    while let Some(p) = todo.pop() {
        if expected.insert(p.clone()) {
            let info = client.require_path_info(&p).await.unwrap();
            todo.extend(info.references);
        }
    }
    assert_eq!(
        closure
            .keys()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>(),
        expected
    );
    assert!(closure.len() > count);
    let err = client
        .query_closure(&[wide.clone(), missing.clone()])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
    assert_connection_usable(&mut client).await;
}

#[tokio::test]
async fn builds_a_derivation_through_the_client_with_its_log() {
    let store = NixStore::start().unwrap();
    let paths = store
        .instantiate(
            r#"with prelude; {
                ok = mkDrv { name = "ok"; script = "echo building-now; echo result > $out"; };
                bad = mkDrv { name = "bad"; script = "echo about-to-fail; exit 3"; };
            }"#,
            &["ok", "bad"],
        )
        .await
        .unwrap();
    let dir = StoreDir::default();
    let mut client = connect(&store).await;

    let drv_bytes = store.read_store_file(&paths["ok"]).await.unwrap();
    let drv = Derivation::parse(&dir, &drv_bytes).unwrap();
    client.add_temp_root(&paths["ok"]).await.unwrap();
    let mut lines = Vec::new();
    let result = client
        .build_derivation(&paths["ok"], &drv, BuildMode::Normal, &mut |l| {
            lines.push(l)
        })
        .await
        .unwrap();
    assert_eq!(result.status, BuildStatus::Built, "{}", result.error_msg);
    assert!(
        lines.contains(&LogLine::Build(b"building-now".to_vec())),
        "{lines:?}"
    );
    let out = dir.display(drv.outputs["out"].path().unwrap());
    assert!(client.is_valid_path(&out).await.unwrap());
    assert_eq!(store.read_store_file(&out).await.unwrap(), b"result\n");

    let bad =
        Derivation::parse(&dir, &store.read_store_file(&paths["bad"]).await.unwrap()).unwrap();
    let result = client
        .build_derivation(&paths["bad"], &bad, BuildMode::Normal, &mut |_| {})
        .await
        .unwrap();
    assert_eq!(result.status, BuildStatus::PermanentFailure);
    assert!(
        result.error_msg.contains("exit code 3"),
        "{}",
        result.error_msg
    );
}

/// Builds print bytes, not text: a NUL and a Latin-1 byte come through
/// the log exactly, and Nix's failure message (which quotes the log's
/// last lines) is read lossily instead of breaking the connection.
#[tokio::test]
async fn log_lines_are_bytes_and_a_failures_message_survives_bad_bytes() {
    let store = NixStore::start().unwrap();
    let paths = store
        .instantiate(
            r#"with prelude; {
                odd = mkDrv { name = "odd"; script = "printf 'a\\000b\\n'; printf 'caf\\351\\n'; exit 1"; };
            }"#,
            &["odd"],
        )
        .await
        .unwrap();
    let dir = StoreDir::default();
    let mut client = connect(&store).await;
    let drv =
        Derivation::parse(&dir, &store.read_store_file(&paths["odd"]).await.unwrap()).unwrap();
    let mut lines = Vec::new();
    let result = client
        .build_derivation(&paths["odd"], &drv, BuildMode::Normal, &mut |l| {
            lines.push(l)
        })
        .await
        .unwrap();
    assert_eq!(result.status, BuildStatus::PermanentFailure);
    let build_lines: Vec<Vec<u8>> = lines
        .into_iter()
        .filter_map(|l| match l {
            LogLine::Build(b) => Some(b),
            LogLine::Daemon(_) => None,
        })
        .collect();
    assert!(build_lines.contains(&b"a\0b".to_vec()), "{build_lines:?}");
    assert!(
        build_lines.contains(&b"caf\xe9".to_vec()),
        "{build_lines:?}"
    );
    assert!(
        result.error_msg.contains("caf\u{fffd}"),
        "{}",
        result.error_msg
    );
    assert_connection_usable(&mut client).await;
}

#[tokio::test]
async fn closure_realisations_and_output_maps() {
    let store = NixStore::start().unwrap();
    let paths = store
        .instantiate(
            r#"with prelude; rec {
                base = mkCA { name = "base"; script = "echo base > $out"; };
                top = mkDrv { name = "top"; script = "echo ${base} > $out"; };
            }"#,
            &["base", "top"],
        )
        .await
        .unwrap();
    store
        .run("nix-store", &["-r", &paths["top"]])
        .await
        .unwrap();
    let mut client = connect(&store).await;

    let top_out = client
        .query_derivation_output_map(&paths["top"])
        .await
        .unwrap()["out"]
        .clone()
        .unwrap();
    let base_out = client
        .query_derivation_output_map(&paths["base"])
        .await
        .unwrap()["out"]
        .clone()
        .unwrap();
    let closure = client
        .query_closure(std::slice::from_ref(&top_out))
        .await
        .unwrap();
    assert!(closure[&top_out].references.contains(&base_out));
    assert_eq!(closure.into_keys().collect::<Vec<_>>(), {
        let mut v = vec![top_out.clone(), base_out.clone()];
        v.sort();
        v
    });

    let fake = Realisation {
        id: format!("sha256:{}!out", "ab".repeat(32)),
        out_path: base_out.trim_start_matches("/nix/store/").to_owned(),
        signatures: vec![],
        dependent_realisations: Default::default(),
    };
    assert_eq!(client.query_realisation(&fake.id).await.unwrap(), None);
    client.register_drv_output(&fake).await.unwrap();
    let got = client.query_realisation(&fake.id).await.unwrap().unwrap();
    assert_eq!(got.out_path, fake.out_path);
}

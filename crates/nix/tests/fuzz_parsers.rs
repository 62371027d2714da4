//! Fuzzing the parsers that read outside bytes, on the stable toolchain:
//! `.drv` files, NARs, narinfos, store paths and hashes, and the daemon's
//! wire format. Inputs are valid seeds mutated (bytes flipped, inserted,
//! deleted, the tail cut off, runs repeated) and plain random bytes. Each
//! parser must never panic, and every error must say where the input went
//! wrong.
//!
//! `HQ_FUZZ_CASES` sets the cases per parser (2,000 in the suite; the
//! README's fuzz command runs 120,000 per parser, 1,080,000 in all).

use hydra_nix::binary_cache::NarInfo;
use hydra_nix::daemon::{BuildMode, DaemonClient};
use hydra_nix::{Derivation, Hash, StoreDir};
use hydra_testkit::fuzz::{config, input};
use proptest::prelude::*;

const OUT: &str = "/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-hello";
const DEP: &str = "/nix/store/0ai9h9hivmbhzgnxsm0sb4nj4lb7mlws-dep.drv";

fn drv_seeds() -> Vec<Vec<u8>> {
    [
        format!(
            r#"Derive([("out","{OUT}","","")],[("{DEP}",["out","dev"])],["/nix/store/9xhf17h8f0dr43pnypvbrhd0h1zl2xg6-src"],"x86_64-linux","/bin/sh",["-c","echo \"hi\\n\" > $out"],[("name","hello"),("out","{OUT}"),("system","x86_64-linux")])"#
        ),
        r#"Derive([("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",["-c","x"],[("__contentAddressed","1"),("name","ca"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9")])"#.to_owned(),
        format!(
            r#"Derive([("out","{OUT}","sha256","2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")],[],[],"builtin","builtin:fetchurl",[],[("name","hello"),("out","{OUT}"),("url","http://example.org/x")])"#
        ),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect()
}

fn nar_seeds() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("nix-support")).unwrap();
    std::fs::write(tree.join("a.txt"), "hello\n").unwrap();
    std::fs::write(tree.join("nix-support/hydra-release-name"), "x-1.0\n").unwrap();
    std::os::unix::fs::symlink("a.txt", tree.join("link")).unwrap();
    vec![
        hydra_nix::nar::single_file_nar(b"Derive([],[],[],\"x\",\"y\",[],[])"),
        hydra_nix::nar::nar_bytes(&tree).unwrap(),
    ]
}

fn narinfo_seeds() -> Vec<Vec<u8>> {
    let info = NarInfo {
        path: OUT.into(),
        url: "nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.zst".into(),
        compression: "zstd".into(),
        file_hash: Hash::sha256(b"file"),
        file_size: 120,
        nar_hash: Hash::sha256(b"nar"),
        nar_size: 376,
        references: vec![OUT.into()],
        deriver: Some(DEP.into()),
        ca: None,
        sigs: vec!["cache-1:c2ln".into()],
    };
    vec![info.to_text().into_bytes()]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_drv_parses_or_says_at_which_byte_it_failed(bytes in input(drv_seeds())) {
        match Derivation::parse(&StoreDir::default(), &bytes) {
            Ok(drv) => {
                // What parses writes back as something that parses again.
                let again = drv.to_aterm(&StoreDir::default());
                let reparsed = Derivation::parse(&StoreDir::default(), again.as_bytes());
                prop_assert!(
                    reparsed.is_ok(),
                    "{:?} parsed, but its text {again:?} does not: {:?}",
                    String::from_utf8_lossy(&bytes),
                    reparsed.err()
                );
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(msg.starts_with("byte "), "{msg}");
                prop_assert!(e.offset <= bytes.len(), "{msg}");
            }
        }
    }

    #[test]
    fn a_nar_reads_or_says_how_far_it_got(bytes in input(nar_seeds())) {
        for result in [
            hydra_nix::nar::check_structure(&bytes),
            hydra_nix::nar::single_file_contents(&bytes).map(|_| ()),
        ] {
            if let Err(e) = result {
                let msg = e.to_string();
                prop_assert!(
                    msg.contains("after byte ") || msg.ends_with("not a single regular file"),
                    "{msg}"
                );
            }
        }
    }

    #[test]
    fn a_narinfo_parses_or_names_its_line(bytes in input(narinfo_seeds())) {
        let text = String::from_utf8_lossy(&bytes);
        if let Err(e) = NarInfo::parse(&text, &StoreDir::default()) {
            let msg = e.to_string();
            prop_assert!(msg.starts_with("narinfo line "), "{msg}");
            prop_assert!(e.line <= text.lines().count(), "{msg}");
        }
    }

    #[test]
    fn store_paths_and_hashes_parse_or_quote_what_is_wrong(bytes in input(vec![
        OUT.as_bytes().to_vec(),
        DEP.as_bytes().to_vec(),
        b"sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3".to_vec(),
        b"sha256-LCa0a2j/xo/5m0U8HTBBNBNCLXBkg7+g+YpeiGJm564=".to_vec(),
    ])) {
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if let Err(e) = StoreDir::default().parse_path(&text) {
            // It quotes the path, or the part of it that is wrong.
            let msg = e.to_string();
            prop_assert!(
                msg.starts_with("path ") || msg.starts_with("store path "),
                "{msg}"
            );
        }
        if let Err(e) = Hash::parse_prefixed(&text) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

/// A daemon's replies: the handshake, a path info, a build with log lines.
fn daemon_transcript() -> Vec<u8> {
    fn u64(out: &mut Vec<u8>, v: u64) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    fn string(out: &mut Vec<u8>, s: &[u8]) {
        u64(out, s.len() as u64);
        out.extend_from_slice(s);
        out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
    }
    const LAST: u64 = 0x616c7473;
    let mut t = Vec::new();
    u64(&mut t, 0x6478696f);
    u64(&mut t, (1 << 8) | 34);
    string(&mut t, b"2.8.0");
    u64(&mut t, LAST);
    // QueryPathInfo
    u64(&mut t, LAST);
    u64(&mut t, 1);
    string(&mut t, DEP.as_bytes());
    string(&mut t, hex::encode([7u8; 32]).as_bytes());
    u64(&mut t, 1);
    string(&mut t, OUT.as_bytes());
    u64(&mut t, 1_700_000_000);
    u64(&mut t, 376);
    u64(&mut t, 0);
    u64(&mut t, 0);
    string(&mut t, b"");
    // BuildDerivation: a log line (a result of type 101), then the result.
    u64(&mut t, 0x52534c54);
    u64(&mut t, 1);
    u64(&mut t, 101);
    u64(&mut t, 1);
    u64(&mut t, 1);
    string(&mut t, b"caf\xe9\0");
    u64(&mut t, LAST);
    u64(&mut t, 3);
    string(&mut t, b"builder failed");
    for v in [1, 0, 1_700_000_000, 1_700_000_001, 0] {
        u64(&mut t, v);
    }
    t
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

proptest! {
    #![proptest_config(config())]

    /// Whatever a daemon (or something pretending to be one) answers, the
    /// client returns an error rather than panicking or allocating without
    /// bound.
    #[test]
    fn the_daemon_client_survives_any_reply(bytes in input(vec![daemon_transcript()])) {
        runtime().block_on(async {
            let (r, w) = (std::io::Cursor::new(bytes), tokio::io::sink());
            let Ok(mut client) = DaemonClient::handshake(Box::new(r), Box::new(w)).await else {
                return;
            };
            let _ = client.query_path_info(OUT).await;
            let drv = Derivation::parse(&StoreDir::default(), &drv_seeds()[0]).unwrap();
            let _ = client
                .build_derivation(OUT, &drv, BuildMode::Normal, &mut |_| {})
                .await;
        });
    }
}

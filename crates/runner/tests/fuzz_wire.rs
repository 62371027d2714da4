//! Fuzzing what the runner reads from builders before anything is used:
//! the builder protocol's messages as they come off the wire (protobuf),
//! a completion report's fields at the boundary (`CheckedReport`), an
//! upload's NAR header, and the output NARs scanned for `nix-support`.
//! Nothing may panic, and each error says where it failed: the field, or
//! the byte.
//!
//! `HQ_FUZZ_CASES` sets the cases (see `hydra_testkit::fuzz`).

use hydra_nix::StoreDir;
use hydra_proto::v1::*;
use hydra_queue_runner::nix_support::scan_nar;
use hydra_queue_runner::outcome::CheckedReport;
use hydra_testkit::fuzz::{config, input};
use proptest::prelude::*;
use prost::Message;

const OUT: &str = "/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-hello";

fn report_seeds() -> Vec<Vec<u8>> {
    let report = CompletionReport {
        machine_id: "5e0cbd9a-7b1e-4f33-9a39-9c0a8f4f6b7e".into(),
        attempt_id: "0c9d7b3e-2f4d-4c6f-8f1a-4b0b1e2d3c4a".into(),
        outcome: Outcome::Succeeded as i32,
        error_msg: "builder for '/nix/store/x.drv' failed with exit code 1".into(),
        outputs: vec![BuiltOutput {
            name: "out".into(),
            path: OUT.into(),
            nar_hash: "sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3".into(),
            nar_size: 376,
        }],
        start_time: 1_700_000_000,
        stop_time: 1_700_000_010,
        times_built: 1,
        is_non_deterministic: false,
    };
    vec![report.encode_to_vec()]
}

fn control_seeds() -> Vec<Vec<u8>> {
    let join = BuilderMessage {
        msg: Some(builder_message::Msg::Join(Join {
            protocol_version: 1,
            machine_name: "b1".into(),
            systems: vec!["x86_64-linux".into()],
            supported_features: vec!["kvm".into()],
            max_jobs: 4,
            speed_factor: 1.0,
            store_dir: "/nix/store".into(),
            instance_id: "i".into(),
            ..Default::default()
        })),
    };
    let progress = BuilderMessage {
        msg: Some(builder_message::Msg::Progress(Progress {
            attempt_id: "0c9d7b3e-2f4d-4c6f-8f1a-4b0b1e2d3c4a".into(),
            phase: Phase::Building as i32,
        })),
    };
    vec![join.encode_to_vec(), progress.encode_to_vec()]
}

fn upload_seeds() -> Vec<Vec<u8>> {
    let header = NarChunk {
        part: Some(nar_chunk::Part::Header(NarHeader {
            machine_id: "m".into(),
            attempt_id: "a".into(),
            store_path: OUT.into(),
            nar_hash: "sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3".into(),
            nar_size: 376,
            references: vec![OUT.into()],
            deriver: String::new(),
            ca: String::new(),
        })),
    };
    let data = NarChunk {
        part: Some(nar_chunk::Part::Data(b"nix-archive-1".to_vec())),
    };
    vec![header.encode_to_vec(), data.encode_to_vec()]
}

fn nar_seeds() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(out.join("nix-support")).unwrap();
    std::fs::write(out.join("report.txt"), "hello").unwrap();
    std::fs::write(
        out.join("nix-support/hydra-build-products"),
        format!("file report {OUT}/report.txt\n"),
    )
    .unwrap();
    std::fs::write(out.join("nix-support/hydra-metrics"), "lines 3 count\n").unwrap();
    vec![hydra_nix::nar::nar_bytes(&out).unwrap()]
}

/// The fields `CheckedReport::check` names in its errors.
const REPORT_FIELDS: [&str; 5] = [
    "output name",
    "output path",
    "start time",
    "stop time",
    "times built",
];

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_report_decodes_and_checks_or_names_the_field(bytes in input(report_seeds())) {
        match CompletionReport::decode(bytes.as_slice()) {
            Err(e) => prop_assert!(e.to_string().contains("decode"), "{e}"),
            Ok(report) => {
                match CheckedReport::check(report) {
                    Err(e) => {
                        let msg = e.to_string();
                        prop_assert!(REPORT_FIELDS.iter().any(|f| msg.starts_with(f)), "{msg}");
                    }
                    // What passes the boundary holds nothing PostgreSQL refuses.
                    Ok(checked) => {
                        prop_assert!(!checked.error_msg.contains('\0'));
                        prop_assert!(checked.outputs.iter().all(|(n, p)| !n.contains('\0') && !p.contains('\0')));
                    }
                }
            }
        }
    }

    #[test]
    fn control_messages_decode_or_fail_cleanly(bytes in input(control_seeds())) {
        if let Err(e) = BuilderMessage::decode(bytes.as_slice()) {
            prop_assert!(e.to_string().contains("decode"), "{e}");
        }
    }

    #[test]
    fn an_upload_header_is_checked_or_says_what_is_wrong(bytes in input(upload_seeds())) {
        match NarChunk::decode(bytes.as_slice()) {
            Err(e) => prop_assert!(e.to_string().contains("decode"), "{e}"),
            Ok(NarChunk { part: Some(nar_chunk::Part::Header(h)) }) => {
                if let Err(e) = h.path_info(&StoreDir::default()) {
                    prop_assert!(!e.to_string().is_empty());
                }
            }
            Ok(_) => {}
        }
    }

    #[test]
    fn an_output_nar_scans_or_says_how_far_it_got(bytes in input(nar_seeds())) {
        if let Err(e) = scan_nar(bytes.as_slice()) {
            let msg = e.to_string();
            prop_assert!(msg.contains("after byte "), "{msg}");
        }
    }
}

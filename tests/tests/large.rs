//! Bytes of any size stream: a 50 MiB log comes out of the CLI whole, in
//! bounded messages; an output larger than one upload part is published to
//! a `file://` and an S3 cache in parts, and what lands there is the
//! output (real Nix substitutes it from the file cache; the S3 object's
//! hashes match its narinfo).

use std::time::Duration;

use hydra_testkit::caches::{S3Server, from_cache, nix_key, uploads_done};
use hydra_testkit::process::{BuilderProcess, RunnerSetup};
use hydra_testkit::{BuilderSpec, Farm, NixStore, create_jobset, queue_builds, wait_finished};

const LIMIT: Duration = Duration::from_secs(180);

/// Lines of 120 digits (`seq -f %0120g`): 53,240,000 bytes of log, more
/// than 50 MiB (long lines: Nix hands a builder its log line by line).
const LINES: u64 = 440_000;

fn line(i: u64) -> String {
    format!("{i:0120}")
}

fn expected_log() -> Vec<u8> {
    let mut out = Vec::with_capacity(54 << 20);
    for i in 1..=LINES {
        out.extend_from_slice(line(i).as_bytes());
        out.push(b'\n');
    }
    out
}

#[tokio::test]
async fn a_50_mib_log_streams_through_the_cli_whole() {
    let mut farm = Farm::start(|_| {}).await.unwrap();
    farm.add_builder(BuilderSpec::new("b")).await.unwrap();
    let ids = farm
        .submit(
            &format!(
                r#"with prelude; {{ chatty = mkDrv {{ name = "chatty"; script = "seq -f %0120g 1 {LINES}; echo done > $out"; }}; }}"#
            ),
            &["chatty"],
        )
        .await
        .unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(farm.statuses(&ids).await.unwrap()["chatty"].0, 0);
    let expected = expected_log();
    assert!(expected.len() > 50 << 20);
    let id = ids["chatty"].to_string();

    // Plain output is the log's bytes, all of them, in order.
    let (ok, shown) = farm.cli(&["logs", &id]).await;
    assert!(ok, "logs of a 50 MiB log");
    assert_eq!(shown.len(), expected.len(), "every byte");
    assert!(shown.as_bytes() == expected.as_slice(), "the log as it was");

    // From a line: numbered lines, from the line asked for.
    let from = (LINES - 3).to_string();
    let (ok, tail) = farm.cli(&["logs", &id, "--from-line", &from]).await;
    assert!(ok);
    let want: Vec<String> = (LINES - 2..=LINES).map(line).collect();
    assert_eq!(tail.lines().collect::<Vec<_>>(), want);
    let from = (LINES - 1).to_string();
    let (ok, tail) = farm
        .cli(&["--json", "logs", &id, "--from-line", &from])
        .await;
    assert!(ok);
    let shown: serde_json::Value = serde_json::from_str(tail.trim()).unwrap();
    assert_eq!(shown["line"], LINES - 1);
    assert_eq!(shown["text"], line(LINES));

    // From a byte: the exact bytes from there.
    let from = (expected.len() - 125).to_string();
    let (ok, tail) = farm.cli(&["logs", &id, "--from-byte", &from]).await;
    assert!(ok);
    assert_eq!(tail, format!("999\n{}\n", line(LINES)));
}

#[tokio::test]
async fn an_output_larger_than_a_part_is_published_in_parts_to_file_and_s3() {
    let s3 = S3Server::start().await;
    let db = hydra_testkit::TestDb::new().await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (secret, public) = nix_key(&store, dir.path(), "large-1").await.unwrap();
    let cache_dir = dir.path().join("cache");
    let file_cache = format!("file://{}", cache_dir.display());
    let setup = RunnerSetup::new_with(
        dir.path(),
        &store,
        &db.url,
        &format!(
            "destinations = [\"{file_cache}\", \"{}\"]\nsigning_key_file = \"{}\"",
            s3.destination(),
            secret.display()
        ),
    )
    .unwrap();
    let _runner = setup.start(&S3Server::credentials()).await.unwrap();
    let _builder = BuilderProcess::start("one", &setup.address, dir.path()).unwrap();
    let jobset = create_jobset(&db.pool).await.unwrap();
    // 24 MiB that do not compress: parts of 8 MiB.
    let job = r#"with prelude; { big = mkDrv { name = "big"; script = "head -c 25165824 /dev/urandom > $out"; }; }"#;
    let drvs = store.instantiate(job, &["big"]).await.unwrap();
    let ids = queue_builds(&db.pool, &store, jobset, &drvs, |_| Default::default())
        .await
        .unwrap();
    wait_finished(&db.pool, ids.values().copied(), LIMIT)
        .await
        .unwrap();
    uploads_done(&db.pool, LIMIT).await.unwrap();
    let (big,): (String,) = sqlx::query_as("select path from BuildOutputs where name = 'out'")
        .fetch_one(&db.pool)
        .await
        .unwrap();

    // The file cache: real Nix substitutes the output, checking the
    // signature, the compressed file and the NAR.
    let fresh = NixStore::start().unwrap();
    let mut args = vec!["--realise", big.as_str()];
    args.extend(from_cache(&file_cache, &public));
    fresh.run("nix-store", &args).await.unwrap();
    let theirs = fresh.read_store_file(&big).await.unwrap();
    assert_eq!(theirs.len(), 24 << 20);

    // The S3 cache: went up in parts (a multipart object's ETag ends in
    // its number of parts), and its hashes are the narinfo's.
    let hash_part = big.rsplit('/').next().unwrap().split('-').next().unwrap();
    let narinfo =
        String::from_utf8(s3.get(&format!("{hash_part}.narinfo")).await.unwrap()).unwrap();
    let field = |name: &str| {
        narinfo
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("{name} in {narinfo}"))
            .to_owned()
    };
    let url = field("URL");
    let (size, etag) = s3.head(&url).await.expect("the NAR is in the bucket");
    assert_eq!(size.to_string(), field("FileSize"));
    // Random bytes do not compress: a little over 24 MiB, in parts of 8.
    let parts = size.div_ceil(8 << 20);
    assert!(parts >= 3);
    let etag = etag.unwrap_or_default();
    assert!(
        etag.trim_matches('"').ends_with(&format!("-{parts}")),
        "{parts} parts: {etag}"
    );
    let compressed = s3.get(&url).await.unwrap();
    assert_eq!(compressed.len().to_string(), field("FileSize"));
    assert_eq!(
        hydra_nix::Hash::sha256(&compressed).to_prefixed_base32(),
        field("FileHash")
    );
    let nar = zstd::decode_all(compressed.as_slice()).unwrap();
    assert_eq!(
        hydra_nix::Hash::sha256(&nar).to_prefixed_base32(),
        field("NarHash")
    );
    let nar_of_theirs = hydra_nix::nar::single_file_nar(&theirs);
    assert!(nar == nar_of_theirs, "the NAR of the output");
}

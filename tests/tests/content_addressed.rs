//! Content-addressed derivations (Nix 2.8 `ca-derivations`) through the
//! whole farm: a step that depends on floating CA outputs is resolved once
//! they are built, the resolved derivation is what a builder builds, and
//! the outputs are recorded as realisations. Output paths are checked
//! against what Nix itself builds in a store of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use hydra_testkit::{BuilderSpec, Farm, NixStore};

const LIMIT: Duration = Duration::from_secs(60);

/// Hydra's content-addressed test jobset, plus multiple outputs, a
/// self-reference, cross references and fixed-output derivations.
const JOBSET: &str = r#"with prelude; rec {
  empty-dir = mkCA { name = "empty-dir"; script = "mkdir $out"; };
  fails = mkCA { name = "fails"; script = "echo going to fail; exit 1"; };
  succeed-with-failed = mkCA { name = "succeed-with-failed"; script = "mkdir -p $out/nix-support; touch $out/nix-support/failed"; };
  ca-depending-on-ca = mkCA { name = "ca-depending-on-ca"; script = "mkdir $out; echo ${empty-dir} > $out/dep"; };
  ca-depending-on-ca-depending-on-ca = mkCA { name = "ca-depending-on-ca-depending-on-ca"; script = "mkdir $out; cat ${ca-depending-on-ca}/dep > $out/deps; echo ${ca-depending-on-ca} >> $out/deps"; };
  ca-depending-on-failing-ca = mkCA { name = "ca-depending-on-failing-ca"; script = "cat ${fails} > $out"; };
  non-ca-depending-on-ca = mkDrv { name = "non-ca-depending-on-ca"; script = "mkdir $out; echo ${empty-dir} > $out/dep"; };
  multi-output-ca = mkCA { name = "multi-output-ca"; outputs = [ "out" "dev" "doc" ]; script = "mkdir $out $dev $doc; echo lib > $out/lib; echo dev > $dev/h; echo doc > $doc/index"; };
  self-reference = mkCA { name = "self-reference"; script = "mkdir $out; echo $out > $out/self"; };
  cross-references = mkCA { name = "cross-references"; outputs = [ "out" "dev" ]; script = "mkdir $out $dev; echo $dev > $out/uses-dev; echo $out > $out/self; echo dev > $dev/h"; };
  ca-depending-on-multi = mkCA { name = "ca-depending-on-multi"; script = "cat ${multi-output-ca.dev}/h ${cross-references}/uses-dev > $out"; };
  fixed = mkFixed { name = "fixed"; text = "fixed content"; };
  ca-depending-on-fixed = mkCA { name = "ca-depending-on-fixed"; script = "cat ${fixed} > $out"; };
  fixed-wrong-hash = mkDrv {
    name = "fixed-wrong-hash";
    script = "printf 'something else' > $out";
    outputHashMode = "flat";
    outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "declared";
  };
}"#;

const JOBS: [(&str, i32); 14] = [
    ("empty-dir", 0),
    ("fails", 1),
    ("succeed-with-failed", 6),
    ("ca-depending-on-ca", 0),
    ("ca-depending-on-ca-depending-on-ca", 0),
    ("ca-depending-on-failing-ca", 2),
    ("non-ca-depending-on-ca", 0),
    ("multi-output-ca", 0),
    ("self-reference", 0),
    ("cross-references", 0),
    ("ca-depending-on-multi", 0),
    ("fixed", 0),
    ("ca-depending-on-fixed", 0),
    ("fixed-wrong-hash", 1),
];

async fn farm() -> Farm {
    let mut farm = Farm::start(|_| {}).await.expect("farm");
    farm.add_builder(BuilderSpec::new("b1").max_jobs(2))
        .await
        .unwrap();
    farm.add_builder(BuilderSpec::new("b2").max_jobs(2))
        .await
        .unwrap();
    farm
}

/// Output name -> path of a build, as BuildOutputs has them.
async fn build_outputs(farm: &Farm, build: i32) -> BTreeMap<String, Option<String>> {
    sqlx::query_as("select name, path from BuildOutputs where build = $1")
        .bind(build)
        .fetch_all(&farm.db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// (stepnr, drvPath, status, resolvedDrvPath) of a build's steps.
type StepRow = (i32, String, Option<i32>, Option<String>);

async fn step_rows(farm: &Farm, build: i32) -> Vec<StepRow> {
    sqlx::query_as(
        "select stepnr, drvPath, status, resolvedDrvPath from BuildSteps where build = $1 order by stepnr",
    )
    .bind(build)
    .fetch_all(&farm.db.pool)
    .await
    .unwrap()
}

/// The output paths Nix gives `drv` when it builds it in a store of its own.
async fn built_by_nix(oracle: &NixStore, drv: &str) -> BTreeSet<String> {
    oracle
        .run("nix-store", &["--realise", drv])
        .await
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_ca_jobset_ends_with_the_statuses_and_paths_nix_gives() {
    let farm = farm().await;
    let jobs: Vec<&str> = JOBS.iter().map(|(j, _)| *j).collect();
    let ids = farm.submit(JOBSET, &jobs).await.unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();

    let statuses = farm.statuses(&ids).await.unwrap();
    let expected: BTreeMap<String, (i32, i32)> =
        JOBS.iter().map(|(j, s)| (j.to_string(), (*s, 0))).collect();
    assert_eq!(statuses, expected);

    // Nix, building the same derivations in a store of its own, gets the
    // same output paths (CA paths depend on contents only).
    let oracle = NixStore::start().unwrap();
    let drvs = oracle
        .instantiate_salted(JOBSET, &jobs, farm.runner_store.salt())
        .await
        .unwrap();
    for (job, status) in JOBS {
        if status != 0 {
            continue;
        }
        let ours: BTreeSet<String> = build_outputs(&farm, ids[job])
            .await
            .into_values()
            .map(|p| p.unwrap_or_else(|| panic!("{job}: an output without a path")))
            .collect();
        assert_eq!(ours, built_by_nix(&oracle, &drvs[job]).await, "{job}");
    }

    // The self-reference and the cross reference survived the transfer:
    // the runner's store has them as Nix made them.
    let outputs = build_outputs(&farm, ids["cross-references"]).await;
    let (out, dev) = (
        outputs["out"].clone().unwrap(),
        outputs["dev"].clone().unwrap(),
    );
    let refs = farm
        .runner_store
        .run("nix-store", &["--query", "--references", &out])
        .await
        .unwrap();
    let refs: BTreeSet<&str> = refs.lines().collect();
    assert_eq!(refs, BTreeSet::from([out.as_str(), dev.as_str()]));

    // The failure of a CA input propagates as a dependency failure.
    let failed: Vec<StepRow> = step_rows(&farm, ids["ca-depending-on-failing-ca"]).await;
    assert!(
        failed
            .iter()
            .any(|r| r.1.ends_with("-fails.drv") && r.2 == Some(1)),
        "{failed:?}"
    );
}

#[tokio::test]
async fn a_resolved_chain_records_status_13_then_the_resolved_steps_success() {
    let farm = farm().await;
    let chain = [
        "empty-dir",
        "ca-depending-on-ca",
        "ca-depending-on-ca-depending-on-ca",
    ];
    let drvs = farm.runner_store.instantiate(JOBSET, &chain).await.unwrap();
    // Only the top of the chain is queued, so its build owns every step.
    let top = "ca-depending-on-ca-depending-on-ca";
    let queued = BTreeMap::from([(top.to_owned(), drvs[top].clone())]);
    let ids = farm.queue(&queued, |_| Default::default()).await.unwrap();
    farm.wait_finished([ids[top]], LIMIT).await.unwrap();
    assert_eq!(farm.statuses(&ids).await.unwrap()[top], (0, 0));

    let rows = step_rows(&farm, ids[top]).await;
    let shape: Vec<(&str, Option<i32>, bool)> = rows
        .iter()
        .map(|(_, drv, status, resolved)| {
            let job = chain
                .iter()
                .find(|j| *drv == drvs[**j])
                .copied()
                .unwrap_or("resolved");
            (job, *status, resolved.is_some())
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("empty-dir", Some(0), false),
            ("ca-depending-on-ca", Some(13), true),
            ("resolved", Some(0), false),
            ("ca-depending-on-ca-depending-on-ca", Some(13), true),
            ("resolved", Some(0), false),
        ],
        "{rows:?}"
    );
    // Each status-13 row names the resolved derivation the next row built,
    // and that derivation is in the runner's store, with no input derivations.
    for pair in rows.windows(2).filter(|w| w[0].2 == Some(13)) {
        let resolved = format!("/nix/store/{}", pair[0].3.as_deref().unwrap());
        assert_eq!(pair[1].1, resolved);
        let text = farm.runner_store.read_store_file(&resolved).await.unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("],[],["), "resolved has no inputDrvs: {text}");
    }
    // The runner's store knows the realisations: Nix there finds every
    // output of the original derivations without building anything.
    let realised = farm
        .runner_store
        .run("nix-store", &["--realise", "--max-jobs", "0", &drvs[top]])
        .await
        .unwrap();
    let ours: BTreeSet<String> = build_outputs(&farm, ids[top])
        .await
        .into_values()
        .flatten()
        .collect();
    assert_eq!(
        realised.lines().map(str::to_owned).collect::<BTreeSet<_>>(),
        ours
    );
}

/// (status, type) of the rows of `drv` in `build`.
async fn terminal(farm: &Farm, build: i32, drv: &str) -> Vec<(i32, i32)> {
    sqlx::query_as(
        "select status, type from BuildSteps where build = $1 and drvPath = $2 order by stepnr",
    )
    .bind(build)
    .bind(drv)
    .fetch_all(&farm.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn two_builds_resolving_alike_at_once_share_one_build_and_each_shows_it() {
    let farm = farm().await;
    let expr = r#"with prelude; rec {
          up1 = mkCA { name = "up"; dummy = "1"; script = "echo same > $out"; };
          up2 = mkCA { name = "up"; dummy = "2"; script = "echo same > $out"; };
          down1 = mkCA { name = "down"; script = "cat ${up1} > $out"; };
          down2 = mkCA { name = "down"; script = "cat ${up2} > $out"; };
        }"#;
    let ids = farm.submit(expr, &["down1", "down2"]).await.unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    let statuses = farm.statuses(&ids).await.unwrap();
    assert_eq!((statuses["down1"].0, statuses["down2"].0), (0, 0));
    let mut terminals = Vec::new();
    for job in ["down1", "down2"] {
        let resolved: Vec<String> = step_rows(&farm, ids[job])
            .await
            .into_iter()
            .filter_map(|r| r.3)
            .collect();
        assert_eq!(resolved.len(), 1, "{job}");
        let resolved = format!("/nix/store/{}", resolved[0]);
        let rows = terminal(&farm, ids[job], &resolved).await;
        if rows.len() != 1 {
            let all: Vec<(i32, i32, String, Option<i32>, i32)> = sqlx::query_as(
                "select build, stepnr, drvPath, status, type from BuildSteps order by build, stepnr",
            )
            .fetch_all(&farm.db.pool)
            .await
            .unwrap();
            panic!("{job}'s resolved step is not within {job}: {rows:?}; every row: {all:#?}");
        }
        assert_eq!(rows[0].0, 0);
        terminals.push(rows[0].1);
    }
    terminals.sort();
    // One built it (type 0); the other shows it (type 1: valid already).
    assert_eq!(terminals, [0, 1], "{terminals:?}");
    let attempts: i64 = sqlx::query_scalar(
        "select count(*) from hqr_attempts where drv_path like '%-down.drv' and outcome = 0",
    )
    .fetch_one(&farm.db.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 1, "built once");
}

#[tokio::test]
async fn early_cutoff_builds_a_downstream_once_when_upstreams_agree() {
    let farm = farm().await;
    let expr = r#"with prelude; rec {
          up1 = mkCA { name = "up"; dummy = "1"; script = "echo same > $out"; };
          up2 = mkCA { name = "up"; dummy = "2"; script = "echo same > $out"; };
          down1 = mkCA { name = "down"; script = "echo down; cat ${up1} > $out"; };
          down2 = mkCA { name = "down"; script = "echo down; cat ${up2} > $out"; };
        }"#;
    let first = farm.submit(expr, &["down1"]).await.unwrap();
    farm.wait_finished(first.values().copied(), LIMIT)
        .await
        .unwrap();
    let second = farm.submit(expr, &["down2"]).await.unwrap();
    farm.wait_finished(second.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(farm.statuses(&first).await.unwrap()["down1"], (0, 0));
    assert_eq!(farm.statuses(&second).await.unwrap()["down2"], (0, 0));

    let resolved_of = |rows: Vec<StepRow>| {
        rows.into_iter()
            .filter_map(|r| r.3)
            .collect::<Vec<String>>()
    };
    let r1 = resolved_of(step_rows(&farm, first["down1"]).await);
    let r2 = resolved_of(step_rows(&farm, second["down2"]).await);
    assert_eq!(r1.len(), 1);
    assert_eq!(r1, r2, "both downstreams resolve to one derivation");
    let resolved = format!("/nix/store/{}", r1[0]);
    assert_eq!(
        terminal(&farm, first["down1"], &resolved).await,
        vec![(0, 0)],
        "built in the first build"
    );
    // Hydra's web interface follows a resolved step to its terminal within
    // the same build: the second build gets a row of its own, type 1
    // (valid already: early cutoff), not a second build.
    assert_eq!(
        terminal(&farm, second["down2"], &resolved).await,
        vec![(0, 1)]
    );
    let attempts: i64 =
        sqlx::query_scalar("select count(*) from hqr_attempts where drv_path like '%-down.drv'")
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 1, "the downstream was built once, on one machine");
    assert_eq!(
        build_outputs(&farm, first["down1"]).await,
        build_outputs(&farm, second["down2"]).await
    );
}

#[tokio::test]
async fn a_damaged_realisation_is_rebuilt_not_trusted() {
    let farm = farm().await;
    let expr = r#"with prelude; rec {
      base = mkCA { name = "base"; script = "echo base > $out"; };
      user = mkCA { name = "user"; script = "cat ${base} > $out"; };
    }"#;
    let base = farm.submit(expr, &["base"]).await.unwrap();
    farm.wait_finished(base.values().copied(), LIMIT)
        .await
        .unwrap();
    let good: String = sqlx::query_scalar(
        "select out_path from hqr_realisations where drv_path like '%-base.drv'",
    )
    .fetch_one(&farm.db.pool)
    .await
    .unwrap();
    // The recorded output of `base` is damaged behind the runner's back.
    sqlx::query(
        "update hqr_realisations set out_path = 'not a store path' where drv_path like '%-base.drv'",
    )
    .execute(&farm.db.pool)
    .await
    .unwrap();
    let user = farm.submit(expr, &["user"]).await.unwrap();
    farm.wait_finished(user.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(farm.statuses(&user).await.unwrap()["user"], (0, 0));
    let steps: Vec<String> = step_rows(&farm, user["user"])
        .await
        .into_iter()
        .filter(|r| r.2 == Some(0))
        .map(|r| r.1)
        .collect();
    assert!(
        steps.iter().any(|d| d.ends_with("-base.drv")),
        "base was built again: {steps:?}"
    );
    let repaired: String = sqlx::query_scalar(
        "select out_path from hqr_realisations where drv_path like '%-base.drv'",
    )
    .fetch_one(&farm.db.pool)
    .await
    .unwrap();
    assert_eq!(repaired, good);
}

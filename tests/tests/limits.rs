//! Per-build limits end a step with Hydra's codes: silent (7), timeout
//! (7), log size (10), output size (11), unsupported system/feature (9).

use std::time::Duration;

use hydra_testkit::{BuilderSpec, Farm, JobOptions};

const JOBS: &str = r#"with prelude; {
  silent = mkDrv { name = "silent"; script = "sleep 60"; };
  chatty-forever = mkDrv { name = "chatty-forever"; script = "while true; do echo tick; sleep 0.2; done"; };
  loud = mkDrv { name = "loud"; script = "i=0; while [ $i -lt 400 ]; do echo line-$i-xxxxxxxxxxxxxxxxxxxxxxxx; i=$((i+1)); done; touch $out"; };
  big = mkDrv { name = "big"; script = "head -c 200000 /dev/zero > $out"; };
  needs-gpu = mkDrv { name = "needs-gpu"; requiredSystemFeatures = [ "gpu" ]; script = "touch $out"; };
  small = mkDrv { name = "small"; script = "echo fine > $out"; };
}"#;

#[tokio::test]
async fn each_limit_ends_the_step_with_its_code() {
    let mut farm = Farm::start(|c| {
        c.max_log_size = 4000;
        c.max_output_size = 50_000;
        c.max_unsupported_secs = 2;
    })
    .await
    .unwrap();
    farm.add_builder(BuilderSpec::new("b").max_jobs(6))
        .await
        .unwrap();
    let ids = farm
        .submit_with(
            JOBS,
            &[
                "silent",
                "chatty-forever",
                "loud",
                "big",
                "needs-gpu",
                "small",
            ],
            |job| match job {
                "silent" => JobOptions {
                    max_silent: Some(1),
                    ..Default::default()
                },
                "chatty-forever" => JobOptions {
                    timeout: Some(2),
                    ..Default::default()
                },
                _ => JobOptions::default(),
            },
        )
        .await
        .unwrap();
    farm.wait_finished(ids.values().copied(), Duration::from_secs(120))
        .await
        .unwrap();
    let statuses = farm.statuses(&ids).await.unwrap();
    let codes: Vec<(&str, i32)> = statuses
        .iter()
        .map(|(j, (s, _))| (j.as_str(), *s))
        .collect();
    assert_eq!(
        codes,
        [
            ("big", 11),
            ("chatty-forever", 7),
            ("loud", 10),
            ("needs-gpu", 9),
            ("silent", 7),
            ("small", 0)
        ]
    );
    let (status, msg): (Option<i32>, Option<String>) =
        sqlx::query_as("select status, errorMsg from BuildSteps where build = $1")
            .bind(ids["needs-gpu"])
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
    assert_eq!(status, Some(9));
    assert!(msg.unwrap().contains("gpu"));
}

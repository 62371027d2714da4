//! The benchmark harness at toy sizes, so that it cannot rot between the
//! runs that measure: every scenario must run to its end and write its
//! JSON. Nothing here is timed (figures come from `scripts/bench.sh`).

use hydra_testkit::process::run_binary;

async fn bench(args: &[&str]) -> serde_json::Value {
    let results = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(hydra_testkit::process::binary("hydra-bench"))
        .args(args)
        .env("HQ_BENCH_RESULTS", results.path())
        .env("HQ_BENCH_CACHE", cache.path())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "hydra-bench {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = std::fs::read_dir(results.path())
        .unwrap()
        .next()
        .expect("a JSON file")
        .unwrap()
        .path();
    serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap()
}

#[tokio::test]
async fn makespan_compares_the_farm_with_local_nix() {
    let v = bench(&["makespan", "--shapes", "deep-3,layered", "--size", "0.02"]).await;
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[0]["shape"], "deep-3", "a shape at a count of steps");
    for r in results {
        assert!(r["local_seconds"].as_f64().unwrap() > 0.0);
        assert!(r["ratio"].as_f64().unwrap() > 0.0);
        let cpu = &r["cpu_ms_per_step"];
        assert!(cpu["farm"].as_f64().unwrap() > 0.0, "{cpu}");
        assert!(cpu["local"].as_f64().unwrap() >= 0.0, "{cpu}");
        let kinds = cpu["farm_by_kind"].as_object().unwrap();
        assert_eq!(kinds.len(), 3, "{cpu}");
    }
}

#[tokio::test]
async fn ingest_latency_transfer_and_scale_run_to_their_end() {
    let v = bench(&["ingest", "--builds", "20"]).await;
    assert_eq!(v["steps"], 60);
    let v = bench(&["latency", "--samples", "3", "--queued", "10"]).await;
    assert_eq!(v["idle"]["samples"], 3);
    let v = bench(&["transfer", "--big-mib", "1", "--small", "10"]).await;
    assert!(v["upload_seconds"].as_f64().unwrap() >= 0.0);
    let v = bench(&[
        "scale",
        "--builders",
        "3",
        "--steps",
        "30",
        "--seconds",
        "2",
    ])
    .await;
    assert_eq!(v["connected"], 3);
}

#[tokio::test]
async fn an_unknown_shape_is_refused_with_the_known_ones() {
    let out = run_binary("hydra-bench", ["makespan", "--shapes", "round"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wide, deep, layered or mixed"), "{err}");
}

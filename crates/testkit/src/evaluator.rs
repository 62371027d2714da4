//! An evaluation as Hydra's `hydra-eval-jobset` records one, for tests
//! that put the runner beside a real Hydra: in one transaction, a
//! `JobsetEvals` row, the builds (`nixName`, `isCurrent = 1`, priority
//! 100, `maxsilent` and `timeout` left NULL unless the job's meta sets
//! them), their `BuildOutputs`, `JobsetEvalMembers`, the
//! `AggregateConstituents` of aggregate jobs, and `notify builds_added`
//! with the lowest new build id as its payload.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use hydra_nix::daemon::DaemonClient;

use crate::NixStore;

/// What one evaluation found: job -> `.drv` path, and aggregate job ->
/// the jobs it is made of.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    pub jobs: BTreeMap<String, String>,
    pub aggregates: BTreeMap<String, Vec<String>>,
}

/// Records `eval` of `jobset` as Hydra's evaluator does; returns job ->
/// build id.
pub async fn record_evaluation(
    pool: &sqlx::PgPool,
    store: &NixStore,
    jobset: i32,
    eval: &Evaluation,
) -> Result<BTreeMap<String, i32>> {
    let mut client = DaemonClient::connect(store.socket()).await?;
    let mut tx = pool.begin().await?;
    let eval_id: i32 = sqlx::query_scalar(
        "insert into JobsetEvals (jobset_id, timestamp, checkoutTime, evalTime, hasNewBuilds, hash, nrBuilds)
         values ($1, extract(epoch from now())::int, 0, 0, 1, md5(random()::text), $2) returning id",
    )
    .bind(jobset)
    .bind(eval.jobs.len() as i32)
    .fetch_one(&mut *tx)
    .await?;
    let system = hydra_builder::config::current_system();
    let mut ids = BTreeMap::new();
    for (job, drv) in &eval.jobs {
        let name = drv
            .rsplit('/')
            .next()
            .and_then(|b| b.get(33..))
            .and_then(|n| n.strip_suffix(".drv"))
            .unwrap_or(job);
        let id: i32 = sqlx::query_scalar(
            "insert into Builds (finished, timestamp, jobset_id, job, nixName, drvPath, system,
                                 maxsilent, timeout, priority, isCurrent, isChannel)
             values (0, extract(epoch from now())::int, $1, $2, $3, $4, $5, null, null, 100, 1, 0)
             returning id",
        )
        .bind(jobset)
        .bind(job)
        .bind(name)
        .bind(drv)
        .bind(&system)
        .fetch_one(&mut *tx)
        .await?;
        let outputs = client
            .query_derivation_output_map(drv)
            .await
            .with_context(|| format!("the outputs of {drv}"))?;
        for (output, path) in outputs {
            sqlx::query("insert into BuildOutputs (build, name, path) values ($1, $2, $3)")
                .bind(id)
                .bind(output)
                .bind(path)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("insert into JobsetEvalMembers (eval, build, isNew) values ($1, $2, 1)")
            .bind(eval_id)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        ids.insert(job.clone(), id);
    }
    for (aggregate, constituents) in &eval.aggregates {
        for c in constituents {
            sqlx::query(
                "insert into AggregateConstituents (aggregate, constituent) values ($1, $2)",
            )
            .bind(ids[aggregate])
            .bind(ids[c])
            .execute(&mut *tx)
            .await?;
        }
    }
    if let Some(lowest) = ids.values().min() {
        sqlx::query("select pg_notify('builds_added', $1)")
            .bind(lowest.to_string())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(ids)
}

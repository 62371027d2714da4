//! The test kit every integration test uses: real PostgreSQL, real Nix.
//!
//! - [`pg`]: a throwaway PostgreSQL 15 cluster per test run (started by the
//!   `with-postgres` wrapper that the README's test command uses, or by the
//!   first test of a process when run alone) and a fresh database per test,
//!   migrated by the project's own migration code. `DATABASE_URL` points the
//!   tests at an existing server instead.
//! - [`nix`]: private Nix stores (a nix-daemon in its own mount namespace
//!   with a private `/nix`), so that the runner and every builder have a
//!   store of their own, and helpers that instantiate small `.nix` files.
//! - [`farm`]: a runner and builders over those, with a queue to submit to.
//! - [`process`]: the runner and builder binaries as processes, for tests
//!   that kill and restart them.
//! - [`tls`]: certificate authorities and certificates made per test.
//! - [`load`]: a load-generator builder that speaks the real protocol and
//!   completes every job at once (benchmarks of the runner alone).
//! - [`evaluator`]: evaluations recorded as Hydra's `hydra-eval-jobset` does.
//! - [`fuzz`]: mutated-seed inputs for the parsers' fuzz tests.
//! - [`caches`]: Nix signing keys and the runner's upload queue, for
//!   binary-cache tests.

pub mod caches;
pub mod current_nix;
pub mod evaluator;
pub mod farm;
pub mod fuzz;
pub mod load;
pub mod nix;
pub mod pg;
pub mod process;
pub mod tls;

pub use farm::{
    ApiClient, BuilderSpec, Farm, JobOptions, create_jobset, eventually, hydra_jobset,
    queue_builds, status_document_until, wait_finished,
};
pub use nix::{NixStore, nix_config};
pub use pg::{PgCluster, TestDb};

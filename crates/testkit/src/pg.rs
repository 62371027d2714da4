//! Throwaway PostgreSQL clusters and per-test databases.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sqlx::PgPool;
use thiserror::Error;

/// Set by `with-postgres` for the processes it runs: the admin URL of the
/// run's cluster.
pub const CLUSTER_URL_ENV: &str = "HYDRA_TEST_PG_URL";
/// More server options for a cluster this crate starts, as `-c name=value`
/// words (to look into a benchmark: `-c shared_preload_libraries=pg_stat_statements`).
pub const EXTRA_OPTIONS_ENV: &str = "HQ_PG_OPTIONS";

#[derive(Debug, Error)]
pub enum PgError {
    #[error(
        "PostgreSQL binaries not found (looked for initdb in $HYDRA_PG_BINDIR, /usr/lib/postgresql/*/bin and PATH)"
    )]
    NoBinaries,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("I/O error preparing the cluster: {0}")]
    Io(#[from] std::io::Error),
}

/// A PostgreSQL cluster in a private directory, listening on a private
/// unix socket and a loopback port. Stopped and removed on drop.
pub struct PgCluster {
    root: PathBuf,
    bindir: PathBuf,
    port: u16,
}

impl PgCluster {
    /// Starts a new cluster (about a second). As root, PostgreSQL runs as
    /// the `postgres` user through `runuser`, since it refuses to run as root.
    pub fn start() -> Result<PgCluster, PgError> {
        let bindir = find_bindir()?;
        let root = tempfile::Builder::new().prefix("hq-pg-").tempdir()?.keep();
        let cluster = PgCluster {
            root,
            bindir,
            port: free_port()?,
        };
        cluster.init_and_start()?;
        Ok(cluster)
    }

    fn init_and_start(&self) -> Result<(), PgError> {
        let data = self.root.join("data");
        let sockets = self.root.join("sock");
        std::fs::create_dir_all(&sockets)?;
        if is_root() {
            chown_to_postgres(&self.root)?;
            chown_to_postgres(&sockets)?;
        }
        self.run(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )?;
        self.start_server()
    }

    /// `pg_ctl start` on the private socket directory and port, tuned for
    /// tests (no fsync: the data is thrown away), plus the options in
    /// [`EXTRA_OPTIONS_ENV`].
    fn start_server(&self) -> Result<(), PgError> {
        let data = self.root.join("data");
        let options = format!(
            "-F -k {} -p {} -c listen_addresses=127.0.0.1 -c max_connections=400 \
             -c synchronous_commit=off -c full_page_writes=off -c shared_buffers=128MB {}",
            path_str(&self.root.join("sock")),
            self.port,
            std::env::var(EXTRA_OPTIONS_ENV).unwrap_or_default(),
        );
        let log = self.root.join("postgres.log");
        let args = [
            "-D",
            path_str(&data),
            "-l",
            path_str(&log),
            "-o",
            &options,
            "-w",
            "-t",
            "60",
            "start",
        ];
        self.run("pg_ctl", &args)
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), PgError> {
        let exe = self.bindir.join(program);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd.args(args).current_dir(&self.root).output()?;
        if out.status.success() {
            return Ok(());
        }
        let log = std::fs::read_to_string(self.root.join("postgres.log")).unwrap_or_default();
        Err(PgError::Command {
            what: format!("{program} {}", args.join(" ")),
            detail: format!(
                "{}\n{}\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }

    /// Stops the server (`-m fast`: every session is terminated, as when
    /// an operator stops the database under the runner); the data stays.
    /// (Not `immediate`: with the tests' `synchronous_commit = off`, that
    /// would lose the last commits, which a real server would not.)
    pub fn stop(&self) -> Result<(), PgError> {
        let data = self.root.join("data");
        self.run(
            "pg_ctl",
            &["-D", path_str(&data), "-m", "fast", "-w", "stop"],
        )
    }

    /// Starts the server again after [`PgCluster::stop`].
    pub fn start_again(&self) -> Result<(), PgError> {
        self.start_server()
    }

    /// The URL of database `db` on this cluster.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the cluster's data, socket and log.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.root.join("data");
        let _ = self.run(
            "pg_ctl",
            &["-D", path_str(&data), "-m", "immediate", "-w", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn chown_to_postgres(path: &Path) -> Result<(), PgError> {
    let out = Command::new("chown")
        .arg("postgres:postgres")
        .arg(path)
        .output()?;
    if !out.status.success() {
        return Err(PgError::Command {
            what: format!("chown postgres {}", path.display()),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

fn find_bindir() -> Result<PathBuf, PgError> {
    if let Ok(dir) = std::env::var("HYDRA_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
    });
    if let Some(dir) = versions.pop() {
        return Ok(dir);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|d| d.join("initdb").exists())
        .ok_or(PgError::NoBinaries)
}

fn free_port() -> Result<u16, PgError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The admin URL of the cluster this process's tests use: the run's cluster
/// (`with-postgres`), `DATABASE_URL`, or one started for this process alone.
pub fn cluster_admin_url() -> String {
    if let Ok(url) = std::env::var(CLUSTER_URL_ENV).or_else(|_| std::env::var("DATABASE_URL")) {
        return url;
    }
    static LOCAL: OnceLock<String> = OnceLock::new();
    LOCAL
        .get_or_init(|| {
            let cluster = PgCluster::start()
                .unwrap_or_else(|e| panic!("cannot start a PostgreSQL cluster: {e}"));
            let url = cluster.url("postgres");
            // Kept until the test process exits; `atexit` removes it then.
            *PROCESS_CLUSTER.lock().unwrap() = Some(cluster);
            // SAFETY: registering a plain extern "C" fn with no captured state.
            unsafe { libc::atexit(drop_process_cluster) };
            url
        })
        .clone()
}

static PROCESS_CLUSTER: std::sync::Mutex<Option<PgCluster>> = std::sync::Mutex::new(None);

extern "C" fn drop_process_cluster() {
    if let Ok(mut guard) = PROCESS_CLUSTER.lock() {
        guard.take();
    }
}

/// Hydra's schema (version 87) as `hydra-init` creates it, written from
/// the facts of Hydra's `hydra.sql` (see the file's head).
pub const HYDRA_SCHEMA: &str = include_str!("hydra-87.sql");

/// A fresh database for one test, on the run's cluster.
pub struct TestDb {
    pub url: String,
    pub name: String,
    pub pool: PgPool,
}

impl TestDb {
    /// A new database with the project's schema applied by its own migrations.
    pub async fn new() -> TestDb {
        let db = Self::empty().await;
        hydra_db::migrate(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("migrating {}: {e}", db.name));
        db
    }

    /// A new database made as Hydra's `hydra-init` makes one (Hydra's
    /// whole schema, version 87, with every constraint: [`HYDRA_SCHEMA`]),
    /// then migrated by the project, as on a farm where this runner
    /// replaces Hydra's.
    pub async fn hydra() -> TestDb {
        let db = Self::empty().await;
        sqlx::raw_sql(HYDRA_SCHEMA)
            .execute(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("creating Hydra's schema in {}: {e}", db.name));
        hydra_db::migrate(&db.pool)
            .await
            .unwrap_or_else(|e| panic!("migrating {} on top of Hydra's schema: {e}", db.name));
        db
    }

    /// A new database with nothing in it.
    pub async fn empty() -> TestDb {
        let admin_url = cluster_admin_url();
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        let admin = hydra_db::connect(&admin_url, 1)
            .await
            .unwrap_or_else(|e| panic!("{admin_url}: {e}"));
        sqlx::query(&format!("create database {name}"))
            .execute(&admin)
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e}"));
        admin.close().await;
        let url = replace_db(&admin_url, &name);
        let pool = hydra_db::connect(&url, 10)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        TestDb { url, name, pool }
    }
}

/// `url` with its database name replaced by `db`.
fn replace_db(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_the_database_in_urls() {
        use super::replace_db;
        assert_eq!(
            replace_db("postgres://u@h:1/postgres", "x"),
            "postgres://u@h:1/x"
        );
        assert_eq!(replace_db("postgres://u@h:1", "x"), "postgres://u@h:1/x");
        assert_eq!(
            replace_db("postgres://u@h/a?sslmode=disable", "x"),
            "postgres://u@h/x?sslmode=disable"
        );
    }
}

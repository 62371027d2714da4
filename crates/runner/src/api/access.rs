//! Who may do what through the client API.
//!
//! Client tokens are files in `client_tokens_dir`, one per client,
//! `<name>.token`, re-read on reload. A file is either a bare secret (an
//! operator's token, as before roles existed) or TOML:
//!
//! ```toml
//! secret = "a long random string"
//! role = "submitter"   # "operator", "submitter" or "reader"
//! tenant = "web"       # the Hydra project it acts for
//! ```
//!
//! - an **operator** may do everything, for every tenant: submit, cancel,
//!   restart (which clears failed paths), bump, drain;
//! - a **submitter** needs a tenant: it submits to, sees, watches, reads
//!   the logs of and cancels its own tenant's builds only;
//! - a **reader** watches and reads status and logs, of its tenant's
//!   builds when it has one, of all builds when not; it changes nothing.
//!
//! Cluster-wide status (queues, machines) is open to every role. Without
//! `client_tokens_dir` every caller is an operator.

use std::path::Path;

use serde::Deserialize;
use tonic::Status;

use crate::Shared;
use crate::auth::{Secrets, TokenError, token_files};
use crate::graph::BuildId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Operator,
    Submitter,
    Reader,
}

/// The caller of a client API call, as its token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token file's name (for logs).
    pub name: String,
    pub role: Role,
    pub tenant: Option<String>,
}

impl Principal {
    /// Everyone, when the runner asks for no client token.
    fn anyone() -> Principal {
        Principal {
            name: "anyone".into(),
            role: Role::Operator,
            tenant: None,
        }
    }

    /// The tenant whose builds alone it may touch; None for all.
    pub fn scope(&self) -> Option<&str> {
        match self.role {
            Role::Operator => None,
            Role::Submitter | Role::Reader => self.tenant.as_deref(),
        }
    }

    /// Submitting to `tenant`.
    pub fn may_submit(&self, tenant: &str) -> Result<(), Status> {
        match (self.role, self.scope()) {
            (Role::Operator, _) => Ok(()),
            (Role::Submitter, Some(own)) if own == tenant => Ok(()),
            (Role::Submitter, Some(own)) => Err(denied(format!(
                "token {} submits for tenant {own}, not {tenant}",
                self.name
            ))),
            _ => Err(self.read_only("submit")),
        }
    }

    /// Changing builds (cancel): operators and submitters.
    pub fn may_change(&self, what: &str) -> Result<(), Status> {
        match self.role {
            Role::Operator | Role::Submitter => Ok(()),
            Role::Reader => Err(self.read_only(what)),
        }
    }

    /// What only an operator does (restart, bump, drain).
    pub fn may_operate(&self, what: &str) -> Result<(), Status> {
        match self.role {
            Role::Operator => Ok(()),
            _ => Err(denied(format!(
                "{what} needs an operator's token; token {} is a {}'s",
                self.name,
                match self.role {
                    Role::Submitter => "submitter",
                    _ => "reader",
                }
            ))),
        }
    }

    /// Listing or watching every build at once is for unscoped tokens.
    pub fn may_see_all(&self, what: &str) -> Result<(), Status> {
        match self.scope() {
            None => Ok(()),
            Some(t) => Err(denied(format!(
                "token {} sees tenant {t}'s builds only: {what} one of them",
                self.name
            ))),
        }
    }

    fn read_only(&self, what: &str) -> Status {
        denied(format!(
            "token {} is a reader's: it cannot {what}",
            self.name
        ))
    }
}

fn denied(message: String) -> Status {
    Status::permission_denied(message)
}

/// The client tokens; `None` inside means none is asked.
#[derive(Debug, Clone, Default)]
pub struct ClientTokens {
    by_secret: Option<Secrets<Principal>>,
}

/// A token file in TOML form.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    secret: String,
    role: Role,
    tenant: Option<String>,
}

impl ClientTokens {
    pub fn none() -> ClientTokens {
        ClientTokens { by_secret: None }
    }

    /// The tokens of `client_tokens_dir`, or none asked without it.
    pub fn from_setting(dir: Option<&Path>) -> Result<ClientTokens, TokenError> {
        dir.map_or(Ok(ClientTokens::none()), ClientTokens::load)
    }

    pub fn load(dir: &Path) -> Result<ClientTokens, TokenError> {
        let mut by_secret = Secrets::default();
        for (name, path, text) in token_files(dir)? {
            let (secret, principal) = parse(&name, &text).map_err(|reason| TokenError::Format {
                path: path.clone(),
                reason,
            })?;
            by_secret.insert(&secret, principal);
        }
        Ok(ClientTokens {
            by_secret: Some(by_secret),
        })
    }

    /// Who calls, from the call's `authorization` header.
    pub fn identify(&self, header: Option<&str>) -> Result<Principal, Status> {
        let Some(tokens) = &self.by_secret else {
            return Ok(Principal::anyone());
        };
        match header.and_then(|h| h.strip_prefix("Bearer ")) {
            None => Err(Status::unauthenticated(
                "this runner's client API requires a token (authorization: Bearer <token>); \
                 pass --token-file or set HYDRA_QUEUE_RUNNER_TOKEN",
            )),
            Some(t) => tokens
                .find(t.trim())
                .cloned()
                .ok_or_else(|| Status::unauthenticated("unknown client token")),
        }
    }
}

/// A token file's secret and principal: TOML with `secret` and `role`, or
/// a bare secret (an operator's).
fn parse(name: &str, text: &str) -> Result<(String, Principal), String> {
    let trimmed = text.trim();
    if !trimmed.contains('=') {
        let principal = Principal {
            name: name.to_owned(),
            role: Role::Operator,
            tenant: None,
        };
        return Ok((trimmed.to_owned(), principal));
    }
    let file: TokenFile = toml::from_str(text).map_err(|e| e.message().to_owned())?;
    if file.secret.trim().is_empty() {
        return Err("`secret` is empty".into());
    }
    if file.role == Role::Submitter && file.tenant.is_none() {
        return Err("a submitter's token needs a `tenant`".into());
    }
    let principal = Principal {
        name: name.to_owned(),
        role: file.role,
        tenant: file.tenant,
    };
    Ok((file.secret.trim().to_owned(), principal))
}

/// Refuses a scoped principal any build of `ids` that is not its tenant's.
pub async fn check_builds(
    shared: &Shared,
    principal: &Principal,
    ids: &[BuildId],
) -> Result<(), Status> {
    let Some(tenant) = principal.scope() else {
        return Ok(());
    };
    let foreign: Option<i32> = sqlx::query_scalar(
        "select b.id from Builds b join Jobsets j on j.id = b.jobset_id
          where b.id = any($1) and j.project is distinct from $2 order by b.id limit 1",
    )
    .bind(ids)
    .bind(tenant)
    .fetch_optional(&shared.api_pool)
    .await
    .map_err(|e| Status::unavailable(format!("database: {e}")))?;
    match foreign {
        None => Ok(()),
        Some(id) => Err(denied(format!(
            "build {id} is not tenant {tenant}'s (token {})",
            principal.name
        ))),
    }
}

/// Refuses a scoped principal the log of a derivation none of its
/// tenant's builds has.
pub async fn check_drv(shared: &Shared, principal: &Principal, drv: &str) -> Result<(), Status> {
    let Some(tenant) = principal.scope() else {
        return Ok(());
    };
    let ours: bool = sqlx::query_scalar(
        "select exists (select 1 from Builds b join Jobsets j on j.id = b.jobset_id
                 where j.project = $2 and (b.drvPath = $1
                    or exists (select 1 from BuildSteps s where s.build = b.id and s.drvPath = $1)))",
    )
    .bind(drv)
    .bind(tenant)
    .fetch_one(&shared.api_pool)
    .await
    .map_err(|e| Status::unavailable(format!("database: {e}")))?;
    if ours {
        Ok(())
    } else {
        Err(denied(format!(
            "no build of tenant {tenant} has {drv} (token {})",
            principal.name
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(files: &[(&str, &str)]) -> Result<ClientTokens, TokenError> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        ClientTokens::load(dir.path())
    }

    fn bearer(secret: &str) -> String {
        format!("Bearer {secret}")
    }

    #[test]
    fn a_bare_secret_is_an_operator_and_toml_names_role_and_tenant() {
        let t = tokens(&[
            ("ops.token", "op-secret\n"),
            (
                "web.token",
                "secret = \"web-secret\"\nrole = \"submitter\"\ntenant = \"web\"\n",
            ),
            ("audit.token", "secret = \"r-secret\"\nrole = \"reader\"\n"),
        ])
        .unwrap();
        let ops = t.identify(Some(&bearer("op-secret"))).unwrap();
        assert_eq!((ops.role, ops.scope()), (Role::Operator, None));
        let web = t.identify(Some(&bearer("web-secret"))).unwrap();
        assert_eq!((web.role, web.scope()), (Role::Submitter, Some("web")));
        assert!(web.may_submit("web").is_ok());
        let other = web.may_submit("mobile").unwrap_err();
        assert_eq!(other.code(), tonic::Code::PermissionDenied);
        assert!(
            other.message().contains("not mobile"),
            "{}",
            other.message()
        );
        assert!(web.may_operate("restart").is_err());
        assert!(web.may_see_all("watch").is_err());
        let audit = t.identify(Some(&bearer("r-secret"))).unwrap();
        assert!(audit.may_submit("web").is_err());
        assert!(audit.may_change("cancel").is_err());
        assert!(
            audit.may_see_all("watch").is_ok(),
            "an unscoped reader sees all"
        );
    }

    #[test]
    fn unknown_and_missing_tokens_are_unauthenticated() {
        let t = tokens(&[("ops.token", "op-secret")]).unwrap();
        let missing = t.identify(None).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(missing.message().contains("requires a token"));
        let wrong = t.identify(Some(&bearer("op-secreT"))).unwrap_err();
        assert_eq!(wrong.message(), "unknown client token");
        assert!(ClientTokens::none().identify(None).is_ok());
    }

    #[test]
    fn a_malformed_token_file_says_which_and_why() {
        for (text, says) in [
            ("secret = \"s\"\nrole = \"admin\"\n", "admin"),
            ("secret = \"s\"\nrole = \"submitter\"\n", "needs a `tenant`"),
            ("secret = \"\"\nrole = \"reader\"\n", "empty"),
            ("secret = \"s\"\nrole = \"reader\"\ncolour = 1\n", "colour"),
        ] {
            let e = tokens(&[("bad.token", text)]).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("bad.token") && msg.contains(says), "{msg}");
        }
    }
}

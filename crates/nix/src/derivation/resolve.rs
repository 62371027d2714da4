//! Resolution of derivations that depend on floating content-addressed
//! outputs (Nix's `Derivation::tryResolve`).
//!
//! A CA derivation's dependents refer to its outputs by *placeholders*,
//! since the real paths are only known after the build. Once every input
//! is built, the dependent is rewritten: placeholders become the real
//! paths, input derivations become input sources, and deferred outputs get
//! their input-addressed paths. The result is a different `.drv` which is
//! what actually gets built.

use std::collections::BTreeMap;

use thiserror::Error;

use super::hashing::{DrvHashKind, HashModuloError, hash_derivation_modulo};
use super::{Derivation, DerivationError, DerivationKind, DerivationOutput};
use crate::hash::Hash;
use crate::store_path::{StoreDir, StorePath, output_path_name};

#[derive(Debug, Error)]
pub enum ResolveError {
    #[error(
        "output {output:?} of input {input} is not known, so the derivation cannot be resolved"
    )]
    MissingInputOutput { input: StorePath, output: String },
    #[error(transparent)]
    Derivation(#[from] DerivationError),
    #[error("the resolved derivation cannot be hashed: {0}")]
    Hash(#[from] HashModuloError),
    #[error("the resolved derivation's outputs are still deferred")]
    StillDeferred,
}

/// The placeholder a derivation's own builder sees for its output
/// `output` when the path is not known in advance (`hashPlaceholder`).
pub fn hash_placeholder(output: &str) -> String {
    format!(
        "/{}",
        Hash::sha256(format!("nix-output:{output}")).to_base32()
    )
}

/// The placeholder a dependent sees for output `output` of the CA
/// derivation `drv_path` (`downstreamPlaceholder`).
pub fn downstream_placeholder(drv_path: &StorePath, output: &str) -> String {
    let drv_name = drv_path
        .name()
        .strip_suffix(".drv")
        .unwrap_or(drv_path.name());
    let clear = format!(
        "nix-upstream-output:{}:{}",
        drv_path.hash_part(),
        output_path_name(drv_name, output)
    );
    format!("/{}", Hash::sha256(clear).to_base32())
}

impl Derivation {
    /// Must this derivation be resolved before it is built? (The test in
    /// Nix 2.8's `DerivationGoal::inputsRealised`.)
    pub fn needs_resolution(&self) -> Result<bool, DerivationError> {
        if self.input_drvs.is_empty() {
            return Ok(false);
        }
        Ok(match self.kind()? {
            DerivationKind::InputAddressed { deferred } => deferred,
            DerivationKind::ContentAddressed { fixed } => !fixed,
            DerivationKind::Impure => true,
        })
    }

    /// Resolves this derivation given the real path of every input output
    /// it uses, keyed by (input `.drv`, output name).
    pub fn resolve(
        &self,
        store: &StoreDir,
        input_outputs: &BTreeMap<(StorePath, String), StorePath>,
    ) -> Result<Derivation, ResolveError> {
        let mut resolved = Derivation {
            input_drvs: BTreeMap::new(),
            ..self.clone()
        };
        let mut rewrites = BTreeMap::new();
        for (input, outputs) in &self.input_drvs {
            for output in outputs {
                let actual = input_outputs
                    .get(&(input.clone(), output.clone()))
                    .ok_or_else(|| ResolveError::MissingInputOutput {
                        input: input.clone(),
                        output: output.clone(),
                    })?;
                rewrites.insert(downstream_placeholder(input, output), store.display(actual));
                resolved.input_srcs.insert(actual.clone());
            }
        }
        let rewrite = |s: &str| {
            rewrites
                .iter()
                .fold(s.to_owned(), |acc, (from, to)| acc.replace(from, to))
        };
        resolved.builder = rewrite(&resolved.builder);
        resolved.args = resolved.args.iter().map(|a| rewrite(a)).collect();
        resolved.env = resolved
            .env
            .iter()
            .map(|(k, v)| (rewrite(k), rewrite(v)))
            .collect();

        if resolved
            .outputs
            .values()
            .any(|o| *o == DerivationOutput::Deferred)
        {
            let h = hash_derivation_modulo(store, &resolved, true, |_| None)?;
            if h.kind == DrvHashKind::Deferred {
                return Err(ResolveError::StillDeferred);
            }
            let name = resolved.name()?.to_owned();
            for (output, out) in resolved.outputs.iter_mut() {
                if *out == DerivationOutput::Deferred {
                    let path = store.make_output_path(output, &h.hashes[output], &name);
                    resolved.env.insert(output.clone(), store.display(&path));
                    *out = DerivationOutput::InputAddressed(path);
                }
            }
        }
        Ok(resolved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downstream_placeholder_matches_nix() {
        // From the .drv Nix 2.8 wrote for a dependent of ca.drv.
        let store = StoreDir::default();
        let ca = store
            .parse_path("/nix/store/ni0hs03sfvslsghklccmb6dhsn8463fr-ca.drv")
            .unwrap();
        assert_eq!(
            downstream_placeholder(&ca, "out"),
            "/0g4kw7209n7k4kfk64by9qfsqg4l5yq0vfnnlxqd4y4pxyn6ajfw"
        );
    }

    #[test]
    fn resolution_without_the_inputs_outputs_fails_clearly() {
        let store = StoreDir::default();
        let text = r#"Derive([("out","","","")],[("/nix/store/ni0hs03sfvslsghklccmb6dhsn8463fr-ca.drv",["out"])],[],"x86_64-linux","/bin/sh",[],[("name","dep"),("out","")])"#;
        let drv = Derivation::parse(&store, text.as_bytes()).unwrap();
        assert!(drv.needs_resolution().unwrap());
        let err = drv.resolve(&store, &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("output \"out\" of input"), "{err}");
    }

    #[test]
    fn a_deferred_derivation_resolves_to_the_paths_nix_gives() {
        // Nix 2.8 resolved this (input-addressed, depending on a floating
        // CA derivation) to if12xmbn...-non-ca-depending-on-ca.drv.
        let store = StoreDir::default();
        let text = r#"Derive([("out","","","")],[("/nix/store/0s3qlrr5yf17lqcqqvmz3qv0iw5p48zq-empty-dir.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","mkdir $out; echo /0n22my7vqmkwhkw1yi3a2qkri6iak844xy4l0r6fyyir6sx2g1db > $out/dep"],[("PATH","/usr/bin:/bin"),("builder","/bin/sh"),("name","non-ca-depending-on-ca"),("out",""),("salt",""),("system","x86_64-linux")])"#;
        let drv = Derivation::parse(&store, text.as_bytes()).unwrap();
        let input = store
            .parse_path("/nix/store/0s3qlrr5yf17lqcqqvmz3qv0iw5p48zq-empty-dir.drv")
            .unwrap();
        let built = store
            .parse_path("/nix/store/gygiwca87yqrsr9rgm137lwlyjnz1mg1-empty-dir")
            .unwrap();
        let inputs = BTreeMap::from([((input, "out".to_owned()), built)]);
        let resolved = drv.resolve(&store, &inputs).unwrap();
        assert_eq!(
            resolved.outputs["out"]
                .path()
                .map(|p| store.display(p))
                .as_deref(),
            Some("/nix/store/8hbby5ylm8kr2jcjsnm6w0qjmzijsbq7-non-ca-depending-on-ca")
        );
        assert_eq!(
            store.display(&resolved.drv_path(&store).unwrap()),
            "/nix/store/if12xmbn4yrimp53nfprqa0civz9kpm3-non-ca-depending-on-ca.drv"
        );
    }
}

//! Every format routine checked against real Nix 2.8 on generated
//! derivation graphs: plain, multi-output, dependent, floating CA, CA on
//! CA, self-referencing CA, fixed-output, input-addressed on CA.

use std::collections::{BTreeMap, HashMap};

use hydra_nix::daemon::{BuildMode, DaemonClient};
use hydra_nix::derivation::DerivationKind;
use hydra_nix::derivation::hashing::{DrvHashes, drv_output_id};
use hydra_nix::{Derivation, StoreDir, StorePath};
use hydra_testkit::NixStore;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Plain,
    Multi,
    Ca,
    CaMulti,
    CaSelfRef,
    Fixed,
}

const KINDS: [Kind; 6] = [
    Kind::Plain,
    Kind::Multi,
    Kind::Ca,
    Kind::CaMulti,
    Kind::CaSelfRef,
    Kind::Fixed,
];

/// A small deterministic generator, so a failure names a reproducible seed.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A Nix expression with `n` derivations `d0..d{n-1}`, each depending on up
/// to three earlier ones.
fn generate(seed: u64, n: usize) -> (String, Vec<String>) {
    let mut rng = Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1);
    let mut kinds = Vec::new();
    let mut attrs = String::new();
    for i in 0..n {
        let kind = KINDS[rng.below(KINDS.len() as u64) as usize];
        let mut refs = Vec::new();
        if kind != Kind::Fixed && i > 0 {
            for _ in 0..rng.below(4) {
                let j = rng.below(i as u64) as usize;
                let multi = matches!(kinds[j], Kind::Multi | Kind::CaMulti);
                refs.push(if multi && rng.below(2) == 0 {
                    format!("${{d{j}.dev}}")
                } else {
                    format!("${{d{j}}}")
                });
            }
        }
        let refs = refs.join(" ");
        let def = match kind {
            Kind::Plain => {
                format!(r#"mkDrv {{ name = "d{i}"; script = "echo {i} {refs} > $out"; }}"#)
            }
            Kind::Ca => format!(r#"mkCA {{ name = "d{i}"; script = "echo {i} {refs} > $out"; }}"#),
            Kind::CaSelfRef => {
                format!(r#"mkCA {{ name = "d{i}"; script = "echo {i} $out {refs} > $out"; }}"#)
            }
            Kind::Multi | Kind::CaMulti => format!(
                r#"{} {{ name = "d{i}"; outputs = [ "out" "dev" ]; script = "echo {i} {refs} > $out; echo dev $out > $dev"; }}"#,
                if kind == Kind::Multi { "mkDrv" } else { "mkCA" }
            ),
            Kind::Fixed => format!(r#"mkFixed {{ name = "d{i}"; text = "fixed {seed} {i}"; }}"#),
        };
        attrs.push_str(&format!("  d{i} = {def};\n"));
        kinds.push(kind);
    }
    (
        format!("with prelude; rec {{\n{attrs}}}"),
        (0..n).map(|i| format!("d{i}")).collect(),
    )
}

struct Graph {
    store: NixStore,
    client: DaemonClient,
    drvs: BTreeMap<String, (Vec<u8>, Derivation)>,
    hashes: DrvHashes,
}

async fn instantiate_graph(seed: u64, n: usize) -> Graph {
    let store = NixStore::start().unwrap();
    let (expr, attrs) = generate(seed, n);
    let attr_refs: Vec<&str> = attrs.iter().map(String::as_str).collect();
    let paths = store.instantiate(&expr, &attr_refs).await.unwrap();
    let mut client = DaemonClient::connect(store.socket()).await.unwrap();
    let dir = StoreDir::default();
    let mut drvs = BTreeMap::new();
    for path in paths.values() {
        let bytes = client.read_store_file(path).await.unwrap();
        let drv =
            Derivation::parse(&dir, &bytes).unwrap_or_else(|e| panic!("seed {seed}: {path}: {e}"));
        drvs.insert(path.clone(), (bytes, drv));
    }
    let mut hashes = DrvHashes::default();
    let by_path: HashMap<StorePath, Derivation> = drvs
        .iter()
        .map(|(p, (_, d))| (dir.parse_path(p).unwrap(), d.clone()))
        .collect();
    for p in by_path.keys() {
        hashes
            .compute(&dir, p, &mut |q: &StorePath| {
                by_path
                    .get(q)
                    .cloned()
                    .ok_or_else(|| std::io::Error::other(format!("{q} not generated")))
            })
            .unwrap();
    }
    Graph {
        store,
        client,
        drvs,
        hashes,
    }
}

#[tokio::test]
async fn drv_files_round_trip_and_every_path_equals_nixs() {
    let dir = StoreDir::default();
    for seed in 1..=3 {
        let g = instantiate_graph(seed, 30).await;
        assert_eq!(g.drvs.len(), 30);
        for (path, (bytes, drv)) in &g.drvs {
            assert_eq!(
                drv.to_aterm(&dir).as_bytes(),
                &bytes[..],
                "seed {seed}: {path} does not round-trip"
            );
            assert_eq!(
                &dir.display(&drv.drv_path(&dir).unwrap()),
                path,
                "seed {seed}: .drv path"
            );
            let expected = g.hashes.expected_output_paths(&dir, drv).unwrap();
            for (output, out) in &drv.outputs {
                match (out.path(), expected.get(output)) {
                    (Some(actual), Some(computed)) => {
                        assert_eq!(actual, computed, "seed {seed}: {path}!{output}")
                    }
                    (None, None) => {}
                    (a, c) => {
                        panic!("seed {seed}: {path}!{output}: Nix has {a:?}, we computed {c:?}")
                    }
                }
            }
        }
    }
}

#[tokio::test]
async fn resolution_and_realisation_ids_equal_nixs() {
    let dir = StoreDir::default();
    let mut g = instantiate_graph(42, 40).await;
    let all: Vec<String> = g.drvs.keys().map(|p| format!("{p}!*")).collect();
    // Nix builds everything and reports each resolution it makes.
    let mut nix_resolved = BTreeMap::new();
    let mut on_log = |line: hydra_nix::daemon::LogLine| {
        if let hydra_nix::daemon::LogLine::Daemon(msg) = line
            && let Some(rest) = msg.strip_prefix("resolved derivation: '")
            && let Some((from, to)) = rest.trim_end_matches('\'').split_once("' -> '")
        {
            nix_resolved.insert(from.to_owned(), to.to_owned());
        }
    };
    let mut builder = DaemonClient::connect(g.store.socket()).await.unwrap();
    builder
        .set_options(&hydra_nix::daemon::ClientSettings {
            verbosity: 3,
            max_build_jobs: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    builder
        .build_paths(&all, BuildMode::Normal, &mut on_log)
        .await
        .unwrap();

    let mut resolved_count = 0;
    for (path, (_, drv)) in g.drvs.clone() {
        // Realisations: CA and deferred outputs are registered under the id
        // computed from hashDerivationModulo.
        let kind = drv.kind().unwrap();
        let map = g.client.query_derivation_output_map(&path).await.unwrap();
        if matches!(
            kind,
            DerivationKind::ContentAddressed { fixed: false }
                | DerivationKind::InputAddressed { deferred: true }
        ) {
            let h = g.hashes.output_hashes(&dir, &drv).unwrap();
            for (output, hash) in &h.hashes {
                let id = drv_output_id(hash, output);
                let r = g.client.query_realisation(&id).await.unwrap();
                let r = r.unwrap_or_else(|| panic!("{path}!{output}: Nix has no realisation {id}"));
                assert!(
                    map[output].as_ref().unwrap().ends_with(&r.out_path),
                    "{path}!{output}"
                );
            }
        }
        if !drv.needs_resolution().unwrap() {
            assert!(
                !nix_resolved.contains_key(&path),
                "Nix resolved {path}, we would not"
            );
            continue;
        }
        let mut inputs = BTreeMap::new();
        for (input, outputs) in &drv.input_drvs {
            let map = g
                .client
                .query_derivation_output_map(&dir.display(input))
                .await
                .unwrap();
            for o in outputs {
                let actual = map[o].as_ref().expect("input output known after the build");
                inputs.insert((input.clone(), o.clone()), dir.parse_path(actual).unwrap());
            }
        }
        let resolved = drv.resolve(&dir, &inputs).unwrap();
        assert!(resolved.input_drvs.is_empty());
        let ours = dir.display(&resolved.drv_path(&dir).unwrap());
        assert_eq!(Some(&ours), nix_resolved.get(&path), "resolution of {path}");
        resolved_count += 1;
    }
    assert!(
        resolved_count > 5,
        "the generated graph exercised only {resolved_count} resolutions"
    );
    assert_eq!(resolved_count, nix_resolved.len());
}

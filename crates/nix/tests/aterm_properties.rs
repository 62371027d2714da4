//! Property tests of the ATerm format on arbitrary derivations and inputs.

use std::collections::{BTreeMap, BTreeSet};

use hydra_nix::store_path::ContentAddressMethod;
use hydra_nix::{Derivation, DerivationOutput, HashAlgo, StoreDir};
use proptest::prelude::*;

fn store_path() -> impl Strategy<Value = hydra_nix::StorePath> {
    ("[0-9a-df-np-sv-z]{32}", "[a-zA-Z0-9+._?=-]{1,20}").prop_filter_map("valid name", |(h, n)| {
        hydra_nix::StorePath::from_base_name(&format!("{h}-{n}")).ok()
    })
}

fn output() -> impl Strategy<Value = DerivationOutput> {
    prop_oneof![
        store_path().prop_map(DerivationOutput::InputAddressed),
        Just(DerivationOutput::Deferred),
        Just(DerivationOutput::Floating {
            method: ContentAddressMethod::Recursive,
            algo: HashAlgo::Sha256
        }),
        (store_path(), any::<[u8; 32]>()).prop_map(|(path, h)| DerivationOutput::Fixed {
            path,
            method: ContentAddressMethod::Flat,
            hash: hydra_nix::Hash {
                algo: HashAlgo::Sha256,
                bytes: h.to_vec()
            },
        }),
    ]
}

fn derivation() -> impl Strategy<Value = Derivation> {
    (
        prop::collection::btree_map("[a-z]{1,8}", output(), 1..4),
        prop::collection::btree_map(
            store_path(),
            prop::collection::btree_set("[a-z]{1,5}", 1..3),
            0..4,
        ),
        prop::collection::btree_set(store_path(), 0..4),
        ".*",
        ".*",
        prop::collection::vec(".*", 0..4),
        prop::collection::btree_map(".*", ".*", 0..6),
    )
        .prop_map(
            |(outputs, input_drvs, input_srcs, platform, builder, args, env)| Derivation {
                outputs,
                input_drvs: input_drvs.into_iter().collect::<BTreeMap<_, BTreeSet<_>>>(),
                input_srcs,
                platform,
                builder,
                args,
                env,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn write_then_parse_is_identity(drv in derivation()) {
        let store = StoreDir::default();
        let text = drv.to_aterm(&store);
        let parsed = Derivation::parse(&store, text.as_bytes()).unwrap();
        prop_assert_eq!(&parsed, &drv);
        prop_assert_eq!(parsed.to_aterm(&store), text);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = Derivation::parse(&StoreDir::default(), &bytes);
    }

    #[test]
    fn corrupting_one_byte_gives_an_error_or_another_valid_derivation(drv in derivation(), at in any::<prop::sample::Index>(), b in any::<u8>()) {
        let store = StoreDir::default();
        let mut bytes = drv.to_aterm(&store).into_bytes();
        let i = at.index(bytes.len());
        bytes[i] = b;
        if let Err(e) = Derivation::parse(&store, &bytes) {
            prop_assert!(e.offset <= bytes.len());
        }
    }
}

//! The DAGs the makespan scenario builds: trivial derivations in shapes
//! that stress different things (fan-out, a long chain, layers with random
//! edges, mixed durations), written as one Nix expression.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone)]
pub struct Node {
    pub deps: Vec<usize>,
    /// How long its builder sleeps (0 for a trivial step).
    pub sleep_ms: u32,
}

#[derive(Debug, Clone)]
pub struct Dag {
    pub shape: String,
    pub nodes: Vec<Node>,
}

impl Dag {
    /// `n` independent steps.
    pub fn wide(n: usize) -> Dag {
        let nodes = (0..n)
            .map(|_| Node {
                deps: vec![],
                sleep_ms: 0,
            })
            .collect();
        Dag {
            shape: format!("wide-{n}"),
            nodes,
        }
    }

    /// A chain of `n`: each step needs the one before.
    pub fn deep(n: usize) -> Dag {
        let nodes = (0..n)
            .map(|i| Node {
                deps: if i == 0 { vec![] } else { vec![i - 1] },
                sleep_ms: 0,
            })
            .collect();
        Dag {
            shape: format!("deep-{n}"),
            nodes,
        }
    }

    /// `layers` layers of `width`; each step needs up to three random
    /// steps of the layer below.
    pub fn layered(layers: usize, width: usize, seed: u64) -> Dag {
        Self::layered_with(layers, width, seed, |_| 0, "layered")
    }

    /// Layers of steps that sleep 0 to 400 ms (most short, a few long).
    pub fn mixed(layers: usize, width: usize, seed: u64) -> Dag {
        Self::layered_with(
            layers,
            width,
            seed,
            |rng| match rng.random_range(0..10) {
                0 => 400,
                1..=3 => 100,
                _ => 0,
            },
            "mixed",
        )
    }

    fn layered_with(
        layers: usize,
        width: usize,
        seed: u64,
        sleep: impl Fn(&mut StdRng) -> u32,
        name: &str,
    ) -> Dag {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut nodes = Vec::new();
        for layer in 0..layers {
            for _ in 0..width {
                let deps = if layer == 0 {
                    vec![]
                } else {
                    let below = (layer - 1) * width;
                    let mut d: Vec<usize> = (0..rng.random_range(1..=3))
                        .map(|_| below + rng.random_range(0..width))
                        .collect();
                    d.sort();
                    d.dedup();
                    d
                };
                let sleep_ms = sleep(&mut rng);
                nodes.push(Node { deps, sleep_ms });
            }
        }
        Dag {
            shape: format!("{name}-{layers}x{width}"),
            nodes,
        }
    }

    /// The expression: `n<i>` for each node and `all`, which needs every
    /// node (the one build both sides build).
    pub fn expression(&self) -> String {
        let mut e = String::from("with prelude; rec {\n");
        for (i, n) in self.nodes.iter().enumerate() {
            let inputs: Vec<String> = n.deps.iter().map(|d| format!("${{n{d}}}")).collect();
            let read = if inputs.is_empty() {
                String::new()
            } else {
                format!("cat {} > /dev/null; ", inputs.join(" "))
            };
            let sleep = if n.sleep_ms > 0 {
                format!("sleep {}.{:03}; ", n.sleep_ms / 1000, n.sleep_ms % 1000)
            } else {
                String::new()
            };
            e.push_str(&format!(
                "  n{i} = mkDrv {{ name = \"n{i}\"; script = \"{read}{sleep}echo {i} > $out\"; }};\n"
            ));
        }
        let all: Vec<String> = (0..self.nodes.len())
            .map(|i| format!("${{n{i}}}"))
            .collect();
        e.push_str(&format!(
            "  all = mkDrv {{ name = \"all\"; script = \"echo {} > $out\"; }};\n}}\n",
            all.join(" ")
        ));
        e
    }

    /// Attribute names: every node, then `all`.
    pub fn attrs(&self) -> Vec<String> {
        let mut a: Vec<String> = (0..self.nodes.len()).map(|i| format!("n{i}")).collect();
        a.push("all".into());
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_the_sizes_and_edges_they_claim() {
        assert_eq!(
            Dag::wide(5)
                .nodes
                .iter()
                .filter(|n| n.deps.is_empty())
                .count(),
            5
        );
        let deep = Dag::deep(4);
        assert_eq!(deep.nodes[3].deps, [2]);
        let layered = Dag::layered(3, 10, 1);
        assert_eq!(layered.nodes.len(), 30);
        assert!(layered.nodes[25].deps.iter().all(|d| (10..20).contains(d)));
        assert!(Dag::deep(3).expression().contains(
            "n2 = mkDrv { name = \"n2\"; script = \"cat ${n1} > /dev/null; echo 2 > $out\"; };"
        ));
    }
}

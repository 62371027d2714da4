{
  description = "A Hydra-style queue runner and remote builders for Nix, in Rust";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        hydra-queue-runner = pkgs.rustPlatform.buildRustPackage {
          pname = "hydra-queue-runner";
          version = "0.1.0";
          src = ./.;
          cargoLock.lockFile = ./Cargo.lock;
          cargoBuildFlags = [ "-p" "hydra-queue-runner" ];
          # The tests need root, PostgreSQL and private Nix stores: run them
          # with scripts/test.sh, not in the sandbox.
          doCheck = false;
        };
        default = hydra-queue-runner;
      });

      nixosModules.queue-runner = import ./nixos/queue-runner.nix;

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [ cargo rustc clippy rustfmt cargo-nextest postgresql_15 nix util-linux ];
        };
      });
    };
}

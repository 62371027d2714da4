{
  description = "A Hydra-style queue runner and remote builders for Nix, in Rust";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs:
        let
          crate = name: pkgs.rustPlatform.buildRustPackage {
            pname = name;
            version = "0.1.0";
            src = ./.;
            cargoLock.lockFile = ./Cargo.lock;
            cargoBuildFlags = [ "-p" name ];
            # The tests need root, PostgreSQL and private Nix stores: run
            # them with scripts/test.sh, not in the sandbox.
            doCheck = false;
          };
        in
        rec {
          hydra-queue-runner = crate "hydra-queue-runner";
          hydra-builder = crate "hydra-builder";
          default = hydra-queue-runner;
        });

      nixosModules = {
        queue-runner = { pkgs, ... }: {
          imports = [ ./nixos/queue-runner.nix ];
          services.hydra-queue-runner-rs.package =
            nixpkgs.lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.hydra-queue-runner;
        };
        builder = { pkgs, ... }: {
          imports = [ ./nixos/builder.nix ];
          services.hydra-builder-rs.package =
            nixpkgs.lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.hydra-builder;
        };
      };

      # What can be checked without root and private stores: the packages
      # build and every .nix file parses. The suite is scripts/test.sh.
      checks = forAllSystems (pkgs: {
        inherit (self.packages.${pkgs.stdenv.hostPlatform.system}) hydra-queue-runner hydra-builder;
        nix-files-parse = pkgs.runCommand "nix-files-parse" { nativeBuildInputs = [ pkgs.nix ]; } ''
          for f in $(find ${./.} -name '*.nix'); do nix-instantiate --parse "$f" > /dev/null; done
          touch $out
        '';
      });

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          packages = with pkgs; [ cargo rustc clippy rustfmt cargo-nextest postgresql_15 nix util-linux ];
        };
      });
    };
}

# Helpers for test derivations. Builders use /bin/sh and the host's
# coreutils (sandbox = false), so no nixpkgs is needed.
#
# holdLog (the current Nix): Nix takes the end of the log for the end of
# the build and kills the builder; a builder that closes its output as it
# exits is sometimes caught still exiting and "failed due to signal 9"
# (NixOS/nix#2176), often in a sandbox under load. With holdLog a helper
# holds the log open until the builder has closed a pipe it keeps, which
# happens only once its exit status is settled.
{ salt ? "", holdLog ? false }:
rec {
  system = builtins.currentSystem;

  holder = "mkfifo $NIX_BUILD_TOP/.hold && { cat $NIX_BUILD_TOP/.hold > /dev/null & } && exec 3> $NIX_BUILD_TOP/.hold && rm $NIX_BUILD_TOP/.hold; ";

  # An input-addressed derivation whose builder runs `script` in sh.
  mkDrv = { name, script, ... }@args:
    derivation ({
      inherit system salt;
      builder = "/bin/sh";
      args = [ "-c" (if holdLog then holder + script else script) ];
      PATH = "/usr/bin:/bin";
    } // builtins.removeAttrs args [ "script" ]);

  # A floating content-addressed derivation.
  mkCA = args: mkDrv (args // {
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
  });

  # A fixed-output derivation producing `text` as a flat file.
  mkFixed = { name, text }:
    mkDrv {
      inherit name;
      script = "printf '%s' '${text}' > $out";
      outputHashMode = "flat";
      outputHashAlgo = "sha256";
      outputHash = builtins.hashString "sha256" text;
    };
}

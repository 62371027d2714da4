# Helpers for test derivations. Builders use /bin/sh and the host's
# coreutils (sandbox = false), so no nixpkgs is needed.
{ salt ? "" }:
rec {
  system = builtins.currentSystem;

  # An input-addressed derivation whose builder runs `script` in sh.
  mkDrv = { name, script, ... }@args:
    derivation ({
      inherit system salt;
      builder = "/bin/sh";
      args = [ "-c" script ];
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

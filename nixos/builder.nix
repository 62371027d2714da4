# NixOS module for a builder agent: it connects to the runner (or to an
# active runner and its standbys, tried in turn), builds with this
# machine's nix-daemon and uploads the outputs. The token file is read at
# start (keep it out of the Nix store); TLS files are paths.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.hydra-builder-rs;
  toml = pkgs.formats.toml { };
  optionalPath = name: value: lib.optionalAttrs (value != null) { ${name} = toString value; };
  settingsFile = toml.generate "hydra-builder.toml" (
    {
      runner_urls = cfg.runnerUrls;
      machine_name = cfg.machineName;
      systems = cfg.systems;
      supported_features = cfg.supportedFeatures;
      mandatory_features = cfg.mandatoryFeatures;
      max_jobs = cfg.maxJobs;
      speed_factor = cfg.speedFactor;
      nix_daemon_socket = cfg.nixDaemonSocket;
      state_dir = "/var/lib/hydra-builder";
      orphan_grace_secs = cfg.orphanGraceSecs;
    }
    // optionalPath "token_file" cfg.tokenFile
    // optionalPath "tls_ca" cfg.tls.caFile
    // optionalPath "tls_cert" cfg.tls.certFile
    // optionalPath "tls_key" cfg.tls.keyFile
    // cfg.settings
  );
in
{
  options.services.hydra-builder-rs = {
    enable = lib.mkEnableOption "a builder agent for the Rust Hydra queue runner";

    package = lib.mkOption {
      type = lib.types.package;
      description = "Package providing the hydra-builder binary.";
    };

    runnerUrls = lib.mkOption {
      type = lib.types.nonEmptyListOf lib.types.str;
      example = [ "https://runner-a.example:7070" "https://runner-b.example:7070" ];
      description = "The runner's builder service; more than one for a hot standby.";
    };

    machineName = lib.mkOption {
      type = lib.types.str;
      default = config.networking.hostName;
      description = "Name in BuildSteps.machine, and for a per-machine token.";
    };

    systems = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ pkgs.stdenv.hostPlatform.system ];
      description = "Systems built here.";
    };

    supportedFeatures = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "kvm" "big-parallel" ];
      description = "Features this machine offers.";
    };

    mandatoryFeatures = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = "Features a step must require to run here.";
    };

    maxJobs = lib.mkOption {
      type = lib.types.ints.positive;
      default = 1;
      description = "Builds at once.";
    };

    speedFactor = lib.mkOption {
      type = lib.types.float;
      default = 1.0;
      description = "Relative speed; the runner prefers faster machines.";
    };

    nixDaemonSocket = lib.mkOption {
      type = lib.types.str;
      default = "/nix/var/nix/daemon-socket/socket";
      description = "The nix-daemon to build with.";
    };

    orphanGraceSecs = lib.mkOption {
      type = lib.types.ints.unsigned;
      default = 600;
      description = ''
        How long builds keep running (and finished results are kept) while no
        runner holds them: a runner restart, crash or failover within it
        loses nothing. Jobs are kept in /var/lib/hydra-builder.
      '';
    };

    tokenFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = "File with this builder's bearer token (outside the Nix store).";
    };

    tls = {
      caFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        description = "CA the runner's certificate must be signed by.";
      };
      certFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        description = "Client certificate for mutual TLS (PEM).";
      };
      keyFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        description = "Its private key (PEM).";
      };
    };

    settings = lib.mkOption {
      type = toml.type;
      default = { };
      description = "Further settings (TOML keys of docs/configuration.md); they win over the options above.";
    };
  };

  config = lib.mkIf cfg.enable {
    nix.settings.trusted-users = [ "hydra-builder" ];

    users.users.hydra-builder = {
      isSystemUser = true;
      group = "hydra-builder";
    };
    users.groups.hydra-builder = { };

    systemd.services.hydra-builder = {
      description = "Hydra builder agent";
      wantedBy = [ "multi-user.target" ];
      after = [ "nix-daemon.service" "network-online.target" ];
      wants = [ "network-online.target" ];
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/hydra-builder --config ${settingsFile}";
        # A builder that loses its runner reconnects by itself; it exits only
        # on bad configuration or a refusal, which a restart will not fix
        # quickly: back off.
        Restart = "always";
        RestartSec = 30;
        User = "hydra-builder";
        # Job records, logs and GC roots of finished outputs, kept across
        # restarts of the builder.
        StateDirectory = "hydra-builder";
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectControlGroups = true;
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
      };
    };
  };
}

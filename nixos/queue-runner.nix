# NixOS module for the queue runner: the schema migration and the daemon.
# Settings are rendered to TOML (see docs/configuration.md for every key).
# TLS, tokens, sd_notify and the hot standby arrive with issue #7.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.hydra-queue-runner-rs;
in
{
  options.services.hydra-queue-runner-rs = {
    enable = lib.mkEnableOption "the Rust Hydra queue runner";

    package = lib.mkOption {
      type = lib.types.package;
      description = "Package providing the hydra-queue-runner binary.";
    };

    databaseUrl = lib.mkOption {
      type = lib.types.str;
      default = "postgres:///hydra?host=/run/postgresql";
      description = "PostgreSQL URL of the Hydra database (local socket by default).";
    };

    settings = lib.mkOption {
      type = lib.types.attrsOf lib.types.anything;
      default = { };
      example = { listen = "0.0.0.0:7070"; max_log_size = 67108864; };
      description = "Settings of hydra-queue-runner serve (TOML keys of docs/configuration.md).";
    };
  };

  config = lib.mkIf cfg.enable {
    users.users.hydra-queue-runner = {
      isSystemUser = true;
      group = "hydra";
    };
    users.groups.hydra = { };

    systemd.services.hydra-queue-runner-migrate = {
      description = "Hydra queue runner: database schema";
      wantedBy = [ "multi-user.target" ];
      after = [ "postgresql.service" ];
      environment.HYDRA_DATABASE_URL = cfg.databaseUrl;
      serviceConfig = {
        Type = "oneshot";
        User = "hydra-queue-runner";
        ExecStart = "${cfg.package}/bin/hydra-queue-runner migrate";
        RemainAfterExit = true;
      };
    };

    systemd.services.hydra-queue-runner = {
      description = "Hydra queue runner";
      wantedBy = [ "multi-user.target" ];
      requires = [ "hydra-queue-runner-migrate.service" ];
      after = [ "hydra-queue-runner-migrate.service" "nix-daemon.service" ];
      environment.HYDRA_DATABASE_URL = cfg.databaseUrl;
      serviceConfig = {
        User = "hydra-queue-runner";
        StateDirectory = "hydra/queue-runner";
        ExecStart = "${cfg.package}/bin/hydra-queue-runner serve --config ${
          (pkgs.formats.toml { }).generate "queue-runner.toml"
            ({ data_dir = "/var/lib/hydra/queue-runner"; } // cfg.settings)
        }";
        Restart = "always";
        RestartSec = 5;
      };
    };
  };
}

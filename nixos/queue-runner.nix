# NixOS module for the queue runner. This first version runs the schema
# migration; the daemon's options (gRPC and HTTP listeners, TLS, tokens,
# limits) arrive with the runner itself.
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
  };
}

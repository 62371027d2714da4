# NixOS module for the queue runner: the schema migration and the daemon.
#
# `settings` is rendered to the runner's TOML file; its keys are those of
# docs/configuration.md (typed options below cover the usual ones, with
# Hydra-like defaults). Secrets stay out of the Nix store: the database URL
# may come from `databaseUrlFile`, builder tokens live in `tokensDir`, TLS
# keys are paths. The unit is Type=notify with a watchdog; `systemctl
# reload` re-reads the settings (SIGHUP). Two machines with this module on
# one database form an active runner and a hot standby (they must reach the
# same Nix store).
#
# Beside NixOS's own `services.hydra` (hydra-server, hydra-evaluator,
# hydra-notify), with `replaceHydraQueueRunner` (on by default when
# services.hydra is enabled): Hydra's queue runner unit is turned off, this
# one runs as Hydra's `hydra-queue-runner` user on Hydra's database and
# HYDRA_DATA (its logs go where hydra-web reads them), and hydra-web is
# told where to ask for the queue runner's status.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.hydra-queue-runner-rs;
  hydra = lib.attrByPath [ "services" "hydra" ] { enable = false; } config;
  besideHydra = cfg.replaceHydraQueueRunner;
  hydraData = if besideHydra then hydra.baseDir or "/var/lib/hydra" else cfg.hydraData;
  toml = pkgs.formats.toml { };
  isLoopback = address: lib.hasPrefix "127." address || lib.hasPrefix "[::1]" address || lib.hasPrefix "localhost:" address;
  builderAuth = cfg.tokensDir != null || cfg.tls.clientCaFile != null;
  optionalPath = name: value: lib.optionalAttrs (value != null) { ${name} = toString value; };
  settingsFile = toml.generate "queue-runner.toml" (
    {
      listen = cfg.listen;
      hydra_data = hydraData;
      store_socket = "/nix/var/nix/daemon-socket/socket";
      # NARs are compressed here before they are published (on disk, not
      # in the private /tmp, which may be RAM).
      spool_dir = "/var/cache/hydra-queue-runner-rs";
      max_log_size = cfg.maxLogSize;
      max_output_size = cfg.maxOutputSize;
      max_tries = cfg.maxTries;
    }
    // lib.optionalAttrs (cfg.httpListen != null) { http_listen = cfg.httpListen; }
    // optionalPath "tls_cert" cfg.tls.certFile
    // optionalPath "tls_key" cfg.tls.keyFile
    // optionalPath "tls_client_ca" cfg.tls.clientCaFile
    // optionalPath "builder_tokens_dir" cfg.tokensDir
    // { client_listen = cfg.clientListen; allow_unauthenticated = cfg.allowUnauthenticated; }
    // optionalPath "client_tokens_dir" cfg.clientTokensDir
    // optionalPath "client_tls_cert" cfg.clientTls.certFile
    // optionalPath "client_tls_key" cfg.clientTls.keyFile
    // cfg.settings
  );
in
{
  options.services.hydra-queue-runner-rs = {
    enable = lib.mkEnableOption "the Rust Hydra queue runner";

    package = lib.mkOption {
      type = lib.types.package;
      description = "Package providing the hydra-queue-runner binary.";
    };

    replaceHydraQueueRunner = lib.mkOption {
      type = lib.types.bool;
      default = hydra.enable or false;
      description = ''
        Run in place of the queue runner of NixOS's services.hydra: Hydra's
        hydra-queue-runner unit is turned off, this runner uses Hydra's
        database (as Hydra's database user), its HYDRA_DATA (services.hydra.baseDir)
        and its hydra-queue-runner user, and hydra-web's queue_runner_endpoint
        points at httpListen. On by default when services.hydra is enabled.
      '';
    };

    hydraData = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/hydra";
      description = "Hydra's data directory (HYDRA_DATA), whose build-logs hold the logs; services.hydra.baseDir beside Hydra.";
    };

    user = lib.mkOption {
      type = lib.types.str;
      default = "hydra-queue-runner";
      description = "The user the runner runs as (Hydra's queue runner user beside Hydra). It is made a trusted user of the nix-daemon: it imports the outputs builders upload, which are not signed.";
    };

    databaseUrl = lib.mkOption {
      type = lib.types.str;
      default = if besideHydra
        then "postgres:///hydra?host=/run/postgresql&user=hydra"
        else "postgres:///hydra?host=/run/postgresql";
      description = "PostgreSQL URL of the Hydra database (local socket by default; beside services.hydra, as Hydra's database user, which its ident map allows).";
    };

    databaseUrlFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = "A file with HYDRA_DATABASE_URL=..., for a URL with a password (read by systemd, kept out of the store).";
    };

    listen = lib.mkOption {
      type = lib.types.str;
      default = "0.0.0.0:7070";
      description = "gRPC address builders connect to.";
    };

    httpListen = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = "127.0.0.1:7071";
      description = "HTTP address of /status and /metrics (Prometheus); null turns it off.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the gRPC port in the firewall.";
    };

    maxLogSize = lib.mkOption {
      type = lib.types.ints.positive;
      default = 64 * 1024 * 1024;
      description = "Largest build log of a step (status 10 beyond), as Hydra's max_log_size.";
    };

    maxOutputSize = lib.mkOption {
      type = lib.types.ints.positive;
      default = 2 * 1024 * 1024 * 1024;
      description = "Largest total output NAR size of a step (status 11 beyond), as Hydra's max_output_size.";
    };

    maxTries = lib.mkOption {
      type = lib.types.ints.positive;
      default = 5;
      description = "Aborted attempts before a step fails as aborted.";
    };

    tls = {
      certFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        description = "TLS certificate (PEM) of the builder service.";
      };
      keyFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        description = "Its private key (PEM); a path outside the Nix store.";
      };
      clientCaFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        description = "CA that builders' client certificates must be signed by (mutual TLS).";
      };
    };

    tokensDir = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = "Directory of builder tokens: <machine>.token admits that builder, shared.token any. Builders must be authenticated (this, or tls.clientCaFile) when listen is not a loopback address.";
    };

    clientListen = lib.mkOption {
      type = lib.types.str;
      default = "127.0.0.1:7072";
      description = "gRPC address of the client API (submit, cancel, status; the CLI), apart from the builders'.";
    };

    clientTokensDir = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = "Directory of client tokens (<name>.token: a bare secret for an operator, or TOML with secret, role and tenant; docs/configuration.md). Required when clientListen is not a loopback address.";
    };

    clientTls = {
      certFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        description = "TLS certificate (PEM) of the client API.";
      };
      keyFile = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        description = "Its private key (PEM); a path outside the Nix store.";
      };
    };

    allowUnauthenticated = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Serve builders or clients beyond loopback without authentication. Never on a farm.";
    };

    settings = lib.mkOption {
      type = toml.type;
      default = { };
      example = { ping_timeout_secs = 60; machine_rest_base_secs = 120.0; };
      description = "Further settings of hydra-queue-runner serve (TOML keys of docs/configuration.md); they win over the options above.";
    };
  };

  config = lib.mkIf cfg.enable (lib.mkMerge [
    {
      # The runner imports the outputs builders upload into the local
      # store; they are not signed, so its nix-daemon must trust it.
      nix.settings.trusted-users = [ cfg.user ];

      # The operator commands (`hydra-queue-runner status`, `watch`, ...) talk
      # to this runner's client API.
      environment.systemPackages = [ cfg.package ];
      environment.variables.HYDRA_QUEUE_RUNNER_URL =
        "${if cfg.clientTls.certFile != null then "https" else "http"}://${cfg.clientListen}";

      # The runner refuses such settings at start; say so at evaluation.
      assertions = [
        {
          assertion = cfg.allowUnauthenticated || isLoopback cfg.listen || builderAuth;
          message = "services.hydra-queue-runner-rs: listen = ${cfg.listen} reaches beyond this machine, but builders are not authenticated: set tokensDir (or tls.certFile, tls.keyFile and tls.clientCaFile), or allowUnauthenticated = true.";
        }
        {
          assertion = cfg.allowUnauthenticated || isLoopback cfg.clientListen || cfg.clientTokensDir != null;
          message = "services.hydra-queue-runner-rs: clientListen = ${cfg.clientListen} reaches beyond this machine, but clients are not authenticated: set clientTokensDir, or allowUnauthenticated = true.";
        }
      ];

      networking.firewall.allowedTCPPorts =
        lib.optional cfg.openFirewall (lib.toInt (lib.last (lib.splitString ":" cfg.listen)));

      # Logs go where hydra-web reads them.
      systemd.tmpfiles.rules = [ "d ${hydraData}/build-logs 0755 ${cfg.user} hydra -" ];

      systemd.services.hydra-queue-runner-rs-migrate = {
        description = "Hydra queue runner: database schema";
        wantedBy = [ "multi-user.target" ];
        after = [ "postgresql.service" ] ++ lib.optional besideHydra "hydra-init.service";
        requires = lib.optional besideHydra "hydra-init.service";
        environment.HYDRA_DATABASE_URL = cfg.databaseUrl;
        serviceConfig = {
          Type = "oneshot";
          User = cfg.user;
          EnvironmentFile = lib.mkIf (cfg.databaseUrlFile != null) cfg.databaseUrlFile;
          ExecStart = "${cfg.package}/bin/hydra-queue-runner migrate";
          RemainAfterExit = true;
        };
      };

      systemd.services.hydra-queue-runner-rs = {
        description = "Hydra queue runner";
        wantedBy = [ "multi-user.target" ];
        requires = [ "hydra-queue-runner-rs-migrate.service" ];
        after = [ "hydra-queue-runner-rs-migrate.service" "nix-daemon.service" "network-online.target" ];
        wants = [ "network-online.target" ];
        environment.HYDRA_DATABASE_URL = cfg.databaseUrl;
        environment.HYDRA_DATA = hydraData;
        reloadTriggers = [ settingsFile ];
        serviceConfig = {
          Type = "notify";
          NotifyAccess = "main";
          WatchdogSec = 60;
          ExecStart = "${cfg.package}/bin/hydra-queue-runner serve --config ${settingsFile}";
          ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
          Restart = "always";
          RestartSec = 5;
          User = cfg.user;
          Group = "hydra";
          EnvironmentFile = lib.mkIf (cfg.databaseUrlFile != null) cfg.databaseUrlFile;
          ReadWritePaths = [ "${hydraData}/build-logs" ];
          CacheDirectory = "hydra-queue-runner-rs";
          # Hardening: the runner needs the build-logs directory, the
          # nix-daemon socket and the network, nothing else.
          NoNewPrivileges = true;
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          PrivateDevices = true;
          ProtectKernelTunables = true;
          ProtectKernelModules = true;
          ProtectControlGroups = true;
          RestrictSUIDSGID = true;
          LockPersonality = true;
          RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" ];
          SystemCallArchitectures = "native";
        };
      };
    }

    (lib.mkIf (!besideHydra) {
      users.users.${cfg.user} = {
        isSystemUser = true;
        group = "hydra";
      };
      users.groups.hydra = { };
    })

    (lib.mkIf besideHydra {
      # Hydra's own queue runner gives way to this one; hydra-server,
      # hydra-evaluator and hydra-notify stay.
      systemd.services.hydra-queue-runner.enable = lib.mkForce false;
      services.hydra.extraConfig = lib.mkIf (cfg.httpListen != null) ''
        queue_runner_endpoint = http://${cfg.httpListen}
      '';
    })
  ]);
}

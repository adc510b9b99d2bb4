# services.roost.coordinator: serves the fleet's signed manifests (with long-poll), takes the
# nodes' signed reports and hosts an embedded Nix binary cache. It holds no signing key: the
# publisher key stays in CI, so a stolen server can delay deployments but never forge one.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.roost.coordinator;
  keys = import ./keys.nix { inherit lib pkgs; };

  port = lib.toInt (lib.last (lib.splitString ":" cfg.listen));
  tls = cfg.tlsCertFile != null;
  inStore = f: builtins.isPath f || lib.hasPrefix builtins.storeDir (toString f);

  # Secrets reach the service through systemd credentials, readable by its dynamic user
  # only, wherever (and whoever's) the original files are.
  credentials =
    lib.optional (cfg.uploadTokenFile != null) "upload-token:${cfg.uploadTokenFile}"
    ++ lib.optional (cfg.adminTokenFile != null) "admin-token:${cfg.adminTokenFile}"
    ++ lib.optional (cfg.readTokenFile != null) "read-token:${cfg.readTokenFile}"
    ++ lib.optionals tls [
      "tls-cert:${cfg.tlsCertFile}"
      "tls-key:${cfg.tlsKeyFile}"
    ];

  args =
    [
      "serve"
      "--listen"
      cfg.listen
      "--state-dir"
      cfg.stateDir
      "--threshold"
      (toString cfg.threshold)
    ]
    ++ lib.concatMap (k: [
      "--publisher-key"
      k
    ]) (keys.keyFiles "publisher-key" cfg.publisherKeys)
    ++ lib.optionals (cfg.uploadTokenFile != null) [
      "--upload-token-file"
      "%d/upload-token"
    ]
    ++ lib.optionals (cfg.adminTokenFile != null) [
      "--admin-token-file"
      "%d/admin-token"
    ]
    ++ lib.optionals (cfg.readTokenFile != null) [
      "--read-token-file"
      "%d/read-token"
    ]
    ++ lib.optional cfg.publicRead "--public-read"
    ++ lib.optionals tls [
      "--tls-cert"
      "%d/tls-cert"
      "--tls-key"
      "%d/tls-key"
    ]
    ++ cfg.extraArgs;
in
{
  options.services.roost.coordinator = {
    enable = lib.mkEnableOption "the roost coordinator, which serves signed manifests, reports and a binary cache to a fleet";

    package = lib.mkPackageOption pkgs "roost-coordinator" {
      extraDescription = "The flake's `nixosModules.coordinator` sets it to the flake's own build; with only this file, add `overlays.default` to nixpkgs.";
    };

    listen = lib.mkOption {
      type = lib.types.strMatching ".+:[0-9]+";
      default = "[::]:8080";
      example = "127.0.0.1:8080";
      description = "Address and port to listen on; `[::]` takes IPv4 and IPv6 on every interface.";
    };

    stateDir = lib.mkOption {
      type = lib.types.strMatching "/var/lib/.+";
      default = "/var/lib/roost-coordinator";
      description = ''
        Manifests, the report database and the binary cache. A folder under {file}`/var/lib`,
        managed by systemd (`StateDirectory`) for the service's dynamic user.
      '';
    };

    publisherKeys = lib.mkOption {
      type = lib.types.nonEmptyListOf keys.keyType;
      example = lib.literalExpression ''[ "fleet-publisher-1:kA9bbo7ZmEZ9h3ZFnSjvQBr3dY6a4RZrBVbPQzHyLTQ=" ./keys/publisher-2.pub ]'';
      description = ''
        Publisher public keys (inline `name:base64` or files): an uploaded manifest must carry
        {option}`threshold` valid signatures from them. The secret halves belong in CI, never here.
      '';
    };

    threshold = lib.mkOption {
      type = lib.types.ints.positive;
      default = 1;
      description = "How many distinct {option}`publisherKeys` must sign an uploaded manifest.";
    };

    uploadTokenFile = lib.mkOption {
      type = lib.types.nullOr (lib.types.either lib.types.str lib.types.path);
      default = null;
      example = "/run/secrets/roost-upload-token";
      description = ''
        A file holding the token (16 characters or more) that lets `publish --cache
        http://HOST/cache` upload store paths to the embedded cache. Give its location on this
        machine as a string; it must not be in the world-readable Nix store (a path literal
        would copy it there). Handed to the service with `LoadCredential`. Without it the cache
        is read-only.
      '';
    };

    adminTokenFile = lib.mkOption {
      type = lib.types.nullOr (lib.types.either lib.types.str lib.types.path);
      default = null;
      example = "/run/secrets/roost-admin-token";
      description = ''
        A file holding the operator's token (16 characters or more) for
        `roost-coordinator node-key`, which pins, replaces or clears the key a node signs its
        reports with. Without it that command takes the {option}`uploadTokenFile` token, so CI
        can re-pin nodes too; set this to keep the two roles apart. Not in the Nix store;
        handed to the service with `LoadCredential`.
      '';
    };

    readTokenFile = lib.mkOption {
      type = lib.types.nullOr (lib.types.either lib.types.str lib.types.path);
      default = null;
      example = "/run/secrets/roost-read-token";
      description = ''
        A file holding the token (16 characters or more) that lets people and monitoring read
        the fleet's data: `/v1/fleet`, report histories, `/metrics` and the dashboard at `/`
        (`roost-coordinator status --token-file`, or the password a browser asks for). The
        admin and upload tokens read too. Not in the Nix store; handed to the service with
        `LoadCredential`. Agents need no token.
      '';
    };

    publicRead = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Let anyone who reaches the coordinator read the fleet's data (node names, versions,
        errors) without a token.
      '';
    };

    tlsCertFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/var/lib/acme/roost.example.org/fullchain.pem";
      description = "TLS certificate chain (PEM): serve HTTPS. Needs {option}`tlsKeyFile`.";
    };

    tlsKeyFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/var/lib/acme/roost.example.org/key.pem";
      description = "TLS private key (PEM), not in the Nix store. Needs {option}`tlsCertFile`.";
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the port of {option}`listen` in the firewall.";
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [
        "--max-nar-bytes"
        "17179869184"
      ];
      description = "Further arguments to `roost-coordinator serve` (see its `--help`).";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.readTokenFile == null || !(inStore cfg.readTokenFile);
        message = "services.roost.coordinator.readTokenFile must not be in the Nix store, where every user can read it.";
      }
      {
        assertion = cfg.uploadTokenFile == null || !(inStore cfg.uploadTokenFile);
        message = "services.roost.coordinator.uploadTokenFile must not be in the Nix store, where every user can read it: give the secret's location on the machine as a string, e.g. \"/run/secrets/roost-upload-token\".";
      }
      {
        assertion = cfg.adminTokenFile == null || !(inStore cfg.adminTokenFile);
        message = "services.roost.coordinator.adminTokenFile must not be in the Nix store, where every user can read it: give the secret's location on the machine as a string, e.g. \"/run/secrets/roost-admin-token\".";
      }
      {
        assertion = (cfg.tlsCertFile == null) == (cfg.tlsKeyFile == null);
        message = "services.roost.coordinator: set both tlsCertFile and tlsKeyFile, or neither.";
      }
      {
        assertion = cfg.tlsKeyFile == null || !(inStore cfg.tlsKeyFile);
        message = "services.roost.coordinator.tlsKeyFile must not be in the Nix store, where every user can read it.";
      }
      {
        assertion = cfg.threshold <= lib.length cfg.publisherKeys;
        message = "services.roost.coordinator.threshold (${toString cfg.threshold}) is larger than the number of publisherKeys (${toString (lib.length cfg.publisherKeys)}).";
      }
    ];

    # For `roost-coordinator status` and `keygen` on the server.
    environment.systemPackages = [ cfg.package ];

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ port ];

    systemd.services.roost-coordinator = {
      description = "roost coordinator: signed manifests, reports and a binary cache for a fleet";
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      wantedBy = [ "multi-user.target" ];
      serviceConfig = {
        Type = "exec";
        ExecStart = "${cfg.package}/bin/roost-coordinator ${lib.escapeShellArgs args}";
        Restart = "on-failure";
        RestartSec = "5s";
        # Exit 2 is a configuration error (bad key file, short token): restarting cannot fix it.
        RestartPreventExitStatus = 2;
        LoadCredential = credentials;

        DynamicUser = true;
        StateDirectory = lib.removePrefix "/var/lib/" cfg.stateDir;
        StateDirectoryMode = "0750";
        UMask = "0027";

        # Hardening: a network service that reads its keys and writes its state folder.
        CapabilityBoundingSet = if port < 1024 then "CAP_NET_BIND_SERVICE" else "";
        AmbientCapabilities = lib.mkIf (port < 1024) [ "CAP_NET_BIND_SERVICE" ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectHostname = true;
        ProtectClock = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        RemoveIPC = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
        ];
        SystemCallErrorNumber = "EPERM";
      };
    };
  };

  meta.maintainers = [ ];
}

# services.roost.coordinator: stores and serves signed manifests, an embedded binary cache and
# the fleet's reports. It holds no signing key.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.roost.coordinator;
  keyFile = k:
    if builtins.isPath k || lib.hasPrefix "/" (toString k)
    then toString k
    else toString (pkgs.writeText "roost-publisher-key" k);
  port = lib.toInt (lib.last (lib.splitString ":" cfg.listen));
  stateName = lib.removePrefix "/var/lib/" cfg.stateDir;
  args = lib.escapeShellArgs (
    [ "serve" "--listen" cfg.listen "--state-dir" cfg.stateDir ]
    ++ lib.concatMap (k: [ "--publisher-key" (keyFile k) ]) cfg.publisherKeys
    ++ lib.optionals (cfg.uploadTokenFile != null) [ "--upload-token-file" "%d/upload-token" ]
    ++ lib.optionals (cfg.tls.certFile != null) [ "--tls-cert" "%d/tls-cert" "--tls-key" "%d/tls-key" ]
    ++ cfg.extraArgs
  );
in
{
  options.services.roost.coordinator = {
    enable = lib.mkEnableOption "the roost coordinator (manifests, binary cache, fleet reports)";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The roost-coordinator package.";
    };

    listen = lib.mkOption {
      type = lib.types.str;
      default = "0.0.0.0:8080";
      example = "[::]:443";
      description = "Address and port to listen on.";
    };

    stateDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/roost-coordinator";
      description = "Where manifests, reports and the cache live (must be under /var/lib).";
    };

    publisherKeys = lib.mkOption {
      type = lib.types.listOf (lib.types.either lib.types.str lib.types.path);
      example = [ "acme-publisher-1:J8Gm0YDm7Tkl1b0x8yGV2hX9QaA6b8pN5YQ3Yk9nQ2c=" ];
      description = "Public keys allowed to sign uploaded manifests.";
    };

    uploadTokenFile = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/run/secrets/roost-upload-token";
      description = "File with the token that authorises cache uploads (`nix copy --to`). Delivered with LoadCredential; must not be in the Nix store.";
    };

    tls = {
      certFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "PEM certificate chain; serve HTTPS.";
      };
      keyFile = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "PEM private key (not in the Nix store).";
      };
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open the listening port in the firewall.";
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "--max-nar-bytes" "4294967296" ];
      description = "More arguments for `roost-coordinator serve`.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.uploadTokenFile == null || !(lib.hasPrefix builtins.storeDir cfg.uploadTokenFile);
        message = "services.roost.coordinator.uploadTokenFile must not be in the Nix store (it would be world-readable)";
      }
      {
        assertion = cfg.tls.keyFile == null || !(lib.hasPrefix builtins.storeDir cfg.tls.keyFile);
        message = "services.roost.coordinator.tls.keyFile must not be in the Nix store";
      }
      {
        assertion = (cfg.tls.certFile == null) == (cfg.tls.keyFile == null);
        message = "services.roost.coordinator.tls needs both certFile and keyFile";
      }
      {
        assertion = lib.hasPrefix "/var/lib/" cfg.stateDir;
        message = "services.roost.coordinator.stateDir must be under /var/lib (it is a StateDirectory)";
      }
    ];

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ port ];

    systemd.services.roost-coordinator = {
      description = "roost coordinator";
      wantedBy = [ "multi-user.target" ];
      after = [ "network.target" ];
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/roost-coordinator ${args}";
        Restart = "on-failure";
        DynamicUser = true;
        StateDirectory = stateName;
        StateDirectoryMode = "0750";
        LoadCredential =
          lib.optional (cfg.uploadTokenFile != null) "upload-token:${cfg.uploadTokenFile}"
          ++ lib.optionals (cfg.tls.certFile != null) [ "tls-cert:${cfg.tls.certFile}" "tls-key:${cfg.tls.keyFile}" ];
        # Hardening: it needs its state folder and the network, nothing else.
        AmbientCapabilities = lib.optional (port < 1024) "CAP_NET_BIND_SERVICE";
        CapabilityBoundingSet = lib.optional (port < 1024) "CAP_NET_BIND_SERVICE";
        NoNewPrivileges = true;
        PrivateTmp = true;
        PrivateDevices = true;
        PrivateUsers = port >= 1024;
        ProtectSystem = "strict";
        ProtectHome = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        ProcSubset = "pid";
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged" "~@resources" ];
        UMask = "0027";
      };
    };
  };

  meta.maintainers = [ ];
}

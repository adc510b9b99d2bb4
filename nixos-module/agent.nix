# services.roost.agent: the pull-based deployment agent on every node.
{ config, lib, pkgs, ... }:

let
  cfg = config.services.roost.agent;
  json = pkgs.formats.json { };

  # Public keys may be given inline ("name:base64") or as files; inline ones go to the store
  # (they are public).
  keyFile = k:
    if builtins.isPath k || lib.hasPrefix "/" (toString k)
    then toString k
    else toString (pkgs.writeText "roost-trusted-key" k);

  settings = {
    coordinators = cfg.coordinators;
    node = cfg.node;
    trusted_keys = map keyFile cfg.trustedKeys;
    threshold = cfg.threshold;
    state_dir = cfg.stateDir;
    interval = cfg.interval;
    build_policy = cfg.buildPolicy;
  } // cfg.settings;

  configFile = json.generate "roost-agent.json" settings;

  # The configuration is checked when the system is built, not when the agent starts.
  checkedConfig = pkgs.runCommand "roost-agent-config.json" { nativeBuildInputs = [ cfg.package ]; } ''
    roost-agent check-config --config ${configFile}
    cp ${configFile} $out
  '';

  agentArgs = "--config ${checkedConfig}";
in
{
  options.services.roost.agent = {
    enable = lib.mkEnableOption "the roost deployment agent, which pulls signed manifests and deploys them";

    package = lib.mkOption {
      type = lib.types.package;
      description = "The roost-agent package.";
    };

    coordinators = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "https://roost.example.org" ];
      description = "Coordinator URLs to poll, tried in order. Empty: manifests only arrive with `roost-agent apply`.";
    };

    node = lib.mkOption {
      type = lib.types.str;
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      description = "This node's name in the flake's `deploy.nodes`.";
    };

    trustedKeys = lib.mkOption {
      type = lib.types.listOf (lib.types.either lib.types.str lib.types.path);
      example = [ "acme-publisher-1:J8Gm0YDm7Tkl1b0x8yGV2hX9QaA6b8pN5YQ3Yk9nQ2c=" ];
      description = "Publisher public keys (`NAME:BASE64` strings or files) whose signatures the agent accepts.";
    };

    threshold = lib.mkOption {
      type = lib.types.ints.positive;
      default = 1;
      description = "How many distinct trusted keys must sign a manifest.";
    };

    interval = lib.mkOption {
      type = lib.types.str;
      default = "5min";
      example = "30s";
      description = "How often to poll (± 20 % jitter). Coordinators that offer long-poll are held open instead, so new manifests arrive within a second.";
    };

    buildPolicy = lib.mkOption {
      type = lib.types.enum [ "substitute-only" "fallback" "build" ];
      default = "fallback";
      description = "Whether the node may build a closure when the cache does not have it.";
    };

    stateDir = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/roost";
      description = "The agent's state folder (node key, state, report queue).";
    };

    mode = lib.mkOption {
      type = lib.types.enum [ "daemon" "timer" ];
      default = "daemon";
      description = ''
        `daemon`: a long-running service (long-poll, instant deploys, reports as they happen).
        `timer`: `roost-agent run --once` from a persistent systemd timer, like `system.autoUpgrade`.
      '';
    };

    timerOnCalendar = lib.mkOption {
      type = lib.types.str;
      default = "hourly";
      description = "When the timer runs, in systemd.time(7) calendar syntax (mode `timer`).";
    };

    settings = lib.mkOption {
      type = json.type;
      default = { };
      example = { extra_substituters = [ "https://cache.example.org" ]; long_poll = false; };
      description = "Anything else for the agent's JSON configuration; overrides the options above.";
    };

    configFile = lib.mkOption {
      type = lib.types.path;
      readOnly = true;
      internal = true;
      description = "The generated configuration (before the build-time check).";
    };
  };

  config = lib.mkIf cfg.enable {
    services.roost.agent.configFile = configFile;

    environment.systemPackages = [ cfg.package ];

    systemd.services.roost-agent = {
      description = "roost deployment agent";
      wantedBy = lib.mkIf (cfg.mode == "daemon") [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      # A switch must never stop or restart the agent in the middle of its own deploy.
      restartIfChanged = false;
      stopIfChanged = false;
      path = [ config.nix.package config.systemd.package ];
      environment.ROOST_STATE_DIR = cfg.stateDir;
      serviceConfig = if cfg.mode == "daemon" then {
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = "${cfg.package}/bin/roost-agent run ${agentArgs}";
        Restart = "always";
        RestartSec = "10s";
        WatchdogSec = "2min";
        StateDirectory = "roost";
        StateDirectoryMode = "0700";
      } else {
        Type = "oneshot";
        ExecStart = "${cfg.package}/bin/roost-agent run --once ${agentArgs}";
        StateDirectory = "roost";
        StateDirectoryMode = "0700";
      };
    };

    systemd.timers.roost-agent = lib.mkIf (cfg.mode == "timer") {
      description = "roost deployment agent (periodic)";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = cfg.timerOnCalendar;
        Persistent = true;
        RandomizedDelaySec = "5min";
      };
    };
  };

  meta.maintainers = [ ];
}

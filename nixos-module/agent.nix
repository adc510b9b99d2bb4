# services.roost.agent: the node side of roost. The agent polls a coordinator for the node's
# signed manifest, realises the closure, switches and activates it under a hard timeout,
# checks health, rolls back on failure and reports. It runs as root because it switches the
# system, and its unit survives the switches it performs.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.roost.agent;
  format = pkgs.formats.json { };
  keys = import ./keys.nix { inherit lib pkgs; };

  # The options below in the agent's own spelling (its config file mirrors its flags), with
  # `settings` on top for everything else.
  generated = lib.recursiveUpdate ({
    inherit (cfg) coordinators node threshold interval;
    system = pkgs.stdenv.hostPlatform.system;
    trusted_keys = keys.keyFiles "trusted-key" cfg.trustedKeys;
    state_dir = cfg.stateDir;
    build_policy = cfg.buildPolicy;
    apply_windows = cfg.applyWindows;
    min_battery_percent = cfg.power.minBatteryPercent;
    defer_on_battery = cfg.power.deferOnBattery;
    metered_max_download = cfg.meteredMaxDownload;
    system_goal = cfg.systemGoal;
    max_defer = cfg.maxDefer;
    keep_generations = cfg.keepGenerations;
    gc_after_deploy = cfg.gcAfterDeploy;
    inherit (cfg) notifications;
  }
  // lib.optionalAttrs (cfg.gcMinFree != null) { gc_min_free = cfg.gcMinFree; }
  // lib.optionalAttrs cfg.metrics.enable { metrics_file = cfg.metrics.file; }
  ) cfg.settings;

  size = lib.types.either lib.types.ints.unsigned (
    lib.types.strMatching "[0-9.]+ ?(B|K|KiB|M|MiB|G|GiB|T|TiB|kB|KB|MB|GB|TB)?"
  );
  nodeExporter = config.services.prometheus.exporters.node;

  rawConfigFile = format.generate "roost-agent.json" generated;

  # Checked at build time, so a typo fails `nixos-rebuild`/`publish`, not the node at 3 am.
  checkedConfigFile =
    pkgs.runCommand "roost-agent-checked.json"
      {
        nativeBuildInputs = [ cfg.package ];
        preferLocalBuild = true;
      }
      ''
        roost-agent check-config --config ${rawConfigFile}
        cp ${rawConfigFile} $out
      '';

  # Cross-compiled systems cannot run the node's agent on the build machine.
  canRunAgent = (pkgs.stdenv.buildPlatform.canExecute or (_: true)) pkgs.stdenv.hostPlatform;

  daemon = cfg.mode == "daemon";
  # Without a coordinator there is nothing to poll (`roost-agent run` refuses with exit 2):
  # the node only applies manifests given to `roost-agent apply`, so nothing starts the unit.
  polls = (generated.coordinators or [ ]) != [ ];
in
{
  options.services.roost.agent = {
    enable = lib.mkEnableOption "the roost agent, which pulls signed deployments from a roost coordinator";

    package = lib.mkPackageOption pkgs "roost-agent" {
      extraDescription = "The flake's `nixosModules.agent` sets it to the flake's own build; with only this file, add `overlays.default` to nixpkgs.";
    };

    coordinators = lib.mkOption {
      type = lib.types.listOf (lib.types.strMatching "https?://.+");
      default = [ ];
      example = [
        "https://roost.example.org"
        "https://roost-backup.example.org"
      ];
      description = ''
        Coordinator base URLs, tried in order. Also a static folder written by
        `roost-coordinator publish --out` behind any web server (no long-poll, no reports there).
        Empty: the node only applies manifests given to `roost-agent apply`, and neither the
        daemon nor the timer is started.
      '';
    };

    node = lib.mkOption {
      type = lib.types.strMatching "[A-Za-z0-9._+-]{1,253}";
      default = config.networking.hostName;
      defaultText = lib.literalExpression "config.networking.hostName";
      example = "pi-kitchen";
      description = "This node's name: its attribute name under `deploy.nodes` in the fleet's flake.";
    };

    trustedKeys = lib.mkOption {
      type = lib.types.nonEmptyListOf keys.keyType;
      example = lib.literalExpression ''
        [
          "fleet-publisher-1:kA9bbo7ZmEZ9h3ZFnSjvQBr3dY6a4RZrBVbPQzHyLTQ="
          ./keys/publisher-2.pub
          "/run/secrets/extra-publisher.pub"
        ]
      '';
      description = ''
        Publisher public keys whose signatures this node accepts on its manifests: inline
        `name:base64` strings (written to the Nix store; they are public) or key files. A
        path literal is copied into the store; a string path is read on the node at run time,
        so set {option}`checkConfig` to `false` when the file does not exist at build time.
      '';
    };

    threshold = lib.mkOption {
      type = lib.types.ints.positive;
      default = 1;
      example = 2;
      description = "How many distinct keys of {option}`trustedKeys` must sign a manifest.";
    };

    interval = lib.mkOption {
      type = lib.types.str;
      default = "5min";
      example = "30s";
      description = ''
        Time between polls (± 20 % jitter) when the coordinator does not hold polls open;
        failed polls back off to an hour. Used in `daemon` mode; a timer uses {option}`dates`.
      '';
    };

    buildPolicy = lib.mkOption {
      type = lib.types.enum [
        "substitute-only"
        "fallback"
        "build"
      ];
      default = "fallback";
      example = "substitute-only";
      description = ''
        Whether the node may build: `substitute-only` fetches from the manifest's caches and
        never builds (small machines), `fallback` builds from the derivation when
        substitution fails, `build` always builds.
      '';
    };

    stateDir = lib.mkOption {
      type = lib.types.strMatching "/.+";
      default = "/var/lib/roost";
      description = "The agent's state folder: the node key, deploy state and queued reports.";
    };

    settings = lib.mkOption {
      type = format.type;
      default = { };
      example = {
        realise_timeout = "2h";
        long_poll = false;
        extra_substituters = [ "https://cache.example.org" ];
      };
      description = ''
        Further keys of the agent's JSON config file (see `roost-agent run --help`), merged over
        the ones the options above produce. Unknown keys fail the build through
        {option}`checkConfig`.
      '';
    };

    checkConfig = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Validate the generated config file with `roost-agent check-config` when the system
        is built (skipped when cross-compiling for a platform the build machine cannot run).
        Turn it off only when a trusted key file exists on the node alone.
      '';
    };

    mode = lib.mkOption {
      type = lib.types.enum [
        "daemon"
        "timer"
      ];
      default = "daemon";
      example = "timer";
      description = ''
        `daemon`: a long-running service that long-polls and deploys within seconds of a
        publish. `timer`: `roost-agent run --once` on the schedule {option}`dates` (runs missed
        while the machine was off happen at the next boot), for machines that should stay quiet.
      '';
    };

    dates = lib.mkOption {
      type = lib.types.str;
      default = "*:0/15";
      example = "04:40";
      description = "In `timer` mode, when to poll, in {manpage}`systemd.time(7)` calendar syntax.";
    };

    randomizedDelaySec = lib.mkOption {
      type = lib.types.str;
      default = "2min";
      example = "45min";
      description = "In `timer` mode, a random delay added to each run, so a fleet does not poll at once.";
    };

    applyWindows = lib.mkOption {
      type = lib.types.listOf (lib.types.strMatching ".*[0-9]{1,2}:[0-9]{2}-[0-9]{1,2}:[0-9]{2}");
      default = [ ];
      example = [
        "Mon-Fri 12:00-13:00"
        "Sat,Sun 00:00-24:00"
      ];
      description = ''
        When this node may switch to a new version, in its local time (`[DAYS] HH:MM-HH:MM`;
        an end at or before the start runs past midnight). A version that arrives outside
        them is downloaded and applied when one opens. Empty: the windows the flake gives
        (`roost.applyWindow`), else any time. These win over the flake's.
      '';
    };

    power = {
      minBatteryPercent = lib.mkOption {
        type = lib.types.ints.between 0 100;
        default = 30;
        description = "On battery below this charge, a deploy waits for mains power.";
      };
      deferOnBattery = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = "Deploy on mains power only.";
      };
    };

    meteredMaxDownload = lib.mkOption {
      type = size;
      default = "100MiB";
      example = "1GiB";
      description = ''
        On a connection NetworkManager calls metered, downloads larger than this (bytes, or
        a size such as `"100MiB"`) wait for another network.
      '';
    };

    systemGoal = lib.mkOption {
      type = lib.types.enum [
        "switch"
        "boot"
      ];
      default = "switch";
      example = "boot";
      description = ''
        `boot`: install every new system for the next boot the user makes instead of
        switching live (laptops); status and reports say a reboot is pending.
      '';
    };

    maxDefer = lib.mkOption {
      type = lib.types.str;
      default = "24h";
      example = "8h";
      description = "The longest `roost-agent defer` may postpone a deploy.";
    };

    notifications = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Desktop notifications to logged-in users (on each user's session bus) when a new
        version waits, is applied, needs a reboot or was rolled back.
      '';
    };

    keepGenerations = lib.mkOption {
      type = lib.types.ints.unsigned;
      default = 5;
      example = 2;
      description = ''
        Healthy generations kept per roost-managed profile, besides the current, booted and
        pending ones; older generations are removed after each successful deploy.
      '';
    };

    gcMinFree = lib.mkOption {
      type = lib.types.nullOr size;
      default = null;
      example = "2GiB";
      description = ''
        Collect garbage after a deploy when the store has less free space than this. Whatever
        this says, a download that would not fit runs a collection first when that makes
        it fit.
      '';
    };

    gcAfterDeploy = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Collect garbage after every successful deploy.";
    };

    metrics = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = nodeExporter.enable;
        defaultText = lib.literalExpression "config.services.prometheus.exporters.node.enable";
        description = ''
          Write the agent's metrics in node-exporter's textfile format to {option}`metrics.file`.
          With the node exporter enabled, its textfile collector is pointed at that folder.
        '';
      };
      file = lib.mkOption {
        type = lib.types.strMatching "/.+\\.prom";
        default = "/var/lib/roost-metrics/roost.prom";
        description = "The metrics file (its folder is readable by the node exporter).";
      };
    };

    configFile = lib.mkOption {
      type = lib.types.path;
      readOnly = true;
      defaultText = lib.literalMD "the generated, checked JSON file";
      description = "The config file the agent runs with (also at {file}`/etc/roost/agent.json`).";
    };
  };

  config = lib.mkIf cfg.enable {
    services.roost.agent.configFile =
      if cfg.checkConfig && canRunAgent then checkedConfigFile else rawConfigFile;

    systemd.tmpfiles.rules = lib.mkIf cfg.metrics.enable [
      "d ${dirOf cfg.metrics.file} 0755 root root -"
    ];
    services.prometheus.exporters.node.extraFlags = lib.mkIf (cfg.metrics.enable && nodeExporter.enable) [
      "--collector.textfile.directory=${dirOf cfg.metrics.file}"
    ];

    # For `roost-agent status`, `roost-agent key` and manual `apply`/`rollback`.
    environment.systemPackages = [ cfg.package ];
    environment.etc."roost/agent.json".source = cfg.configFile;

    systemd.services.roost-agent = {
      description = "roost agent: pull-based deployments";
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      wantedBy = lib.mkIf (daemon && polls) [ "multi-user.target" ];
      # nix-store and nix-env for realising and switching; systemd-run is on the default path.
      path = [ config.nix.package ];
      # A switch must not stop or restart the agent that is performing it: the new unit
      # takes effect at the agent's next start (a reboot, or `systemctl restart` when idle).
      restartIfChanged = false;
      stopIfChanged = false;
      serviceConfig =
        {
          ExecStart = "${cfg.package}/bin/roost-agent run --config ${cfg.configFile}${lib.optionalString (!daemon) " --once"}";
          StateDirectory = lib.mkIf (lib.hasPrefix "/var/lib/" cfg.stateDir) (
            lib.removePrefix "/var/lib/" cfg.stateDir
          );
          StateDirectoryMode = "0700";
        }
        // (
          if daemon then
            {
              Type = "notify";
              NotifyAccess = "main";
              # The agent pings while it keeps its own deadlines; a wedged agent is restarted
              # and its start-up recovery finishes or rolls back the interrupted deploy.
              WatchdogSec = lib.mkDefault "5min";
              # READY comes after start-up recovery, which may confirm or roll back an
              # interrupted deploy. Each of its steps runs under the agent's own hard
              # timeouts (activation, health checks); a fixed start limit would kill a
              # rollback halfway.
              TimeoutStartSec = lib.mkDefault "infinity";
              Restart = "always";
              RestartSec = "10s";
              # Exit 2 is a configuration error: restarting cannot fix it.
              RestartPreventExitStatus = 2;
            }
          else
            {
              Type = "oneshot";
            }
        );
    };

    systemd.timers.roost-agent = lib.mkIf (!daemon && polls) {
      description = "roost agent: poll and deploy";
      wantedBy = [ "timers.target" ];
      timerConfig = {
        OnCalendar = cfg.dates;
        RandomizedDelaySec = cfg.randomizedDelaySec;
        # Like system.autoUpgrade: a run missed while the machine was off happens at boot.
        Persistent = true;
      };
    };
  };

  meta.maintainers = [ ];
}

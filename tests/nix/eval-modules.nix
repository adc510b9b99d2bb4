# Evaluates both NixOS modules with only nixpkgs' `lib` (no nixpkgs, no NixOS): the few
# NixOS options they touch are stubbed as free-form, and `pkgs` is the least it needs.
# Used by tests/tests/nixos_module.rs when ROOST_NIXPKGS_LIB points at a nixpkgs `lib` folder.
{ libPath, agentKey, publisherKey }:
let
  lib = import libPath;
  freeform = lib.types.attrsOf (lib.types.submodule { freeformType = lib.types.attrsOf lib.types.anything; });
  stubs = { lib, ... }: {
    options = {
      systemd.services = lib.mkOption { type = freeform; default = { }; };
      systemd.timers = lib.mkOption { type = freeform; default = { }; };
      systemd.package = lib.mkOption { default = "/run/current-system/systemd"; };
      networking.hostName = lib.mkOption { type = lib.types.str; default = "stub-host"; };
      networking.firewall.allowedTCPPorts = lib.mkOption { type = lib.types.listOf lib.types.port; default = [ ]; };
      nix.package = lib.mkOption { default = "/run/current-system/sw"; };
      environment.systemPackages = lib.mkOption { type = lib.types.listOf lib.types.anything; default = [ ]; };
      assertions = lib.mkOption { type = lib.types.listOf lib.types.anything; default = [ ]; };
      meta = lib.mkOption { type = lib.types.attrsOf lib.types.anything; default = { }; };
    };
  };
  pkgs = {
    formats.json = { }: {
      type = lib.types.attrsOf lib.types.anything;
      generate = name: value: builtins.toFile name (builtins.toJSON value);
    };
    writeText = builtins.toFile;
    runCommand = name: _env: _script: "/nix/store/00000000000000000000000000000000-${name}";
  };
  eval = modules: lib.evalModules {
    modules = [ stubs ../../nixos-module/default.nix ] ++ modules;
    specialArgs = { inherit pkgs; };
  };
  agent = eval [{
    networking.hostName = "pi-kitchen";
    services.roost.agent = {
      enable = true;
      package = builtins.toFile "fake-roost-agent" "";
      coordinators = [ "https://roost.example.org" ];
      trustedKeys = [ agentKey ];
      interval = "1min";
      buildPolicy = "substitute-only";
      settings.long_poll = false;
    };
  }];
  timer = eval [{
    services.roost.agent = {
      enable = true;
      package = builtins.toFile "fake-roost-agent" "";
      trustedKeys = [ agentKey ];
      mode = "timer";
    };
  }];
  coordinator = token: eval [{
    services.roost.coordinator = {
      enable = true;
      package = builtins.toFile "fake-roost-coordinator" "";
      publisherKeys = [ publisherKey ];
      uploadTokenFile = token;
      openFirewall = true;
    };
  }];
  failed = c: map (a: a.message) (builtins.filter (a: !a.assertion) c.config.assertions);
in
{
  agentUnit = agent.config.systemd.services.roost-agent;
  agentConfig = builtins.readFile agent.config.services.roost.agent.configFile;
  timerUnit = timer.config.systemd.services.roost-agent;
  timer = timer.config.systemd.timers.roost-agent;
  coordinatorUnit = (coordinator "/run/secrets/token").config.systemd.services.roost-coordinator;
  firewall = (coordinator "/run/secrets/token").config.networking.firewall.allowedTCPPorts;
  coordinatorOk = failed (coordinator "/run/secrets/token");
  tokenInStore = failed (coordinator "/nix/store/00000000000000000000000000000000-token");
}

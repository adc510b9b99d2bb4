# roost's NixOS modules evaluated with nixpkgs' `lib` alone: no nixpkgs, no NixOS, no
# network. A stub declares the few NixOS options the modules read and set, with the types
# NixOS gives them; a stub `pkgs` provides the builders they call as tiny real derivations
# (builder /bin/sh), so the generated files build, and the agent's config check runs, with
# whatever Nix is at hand. tests/tests/nixos_module.rs drives it; by hand:
#
#   nix-instantiate --eval --strict --json nix/module-eval.nix \
#     --arg lib 'import /path/to/nixpkgs/lib' \
#     --arg configuration '{ services.roost.agent = { enable = true; trustedKeys = [ "k:…" ]; }; }' \
#     -A config.systemd.services.roost-agent.serviceConfig
{
  # nixpkgs' lib (`import <nixpkgs/lib>`).
  lib,
  # The machine's settings: a module.
  configuration,
  # Binaries the stub packages link to (the workspace's debug builds in the tests).
  agentBin ? "/bin/false",
  coordinatorBin ? "/bin/false",
  system ? builtins.currentSystem,
}:

let
  inherit (lib) mkOption types;

  # A derivation built by a /bin/sh script, as strict as stdenv's (`set -eu`).
  sh =
    name: script: env:
    derivation (
      {
        inherit name system;
        builder = "/bin/sh";
        args = [
          "-c"
          ''
            set -eu
            ${script}
          ''
        ];
        PATH = "/usr/bin:/bin";
      }
      // env
    );

  jsonValue =
    types.nullOr (
      types.oneOf [
        types.bool
        types.int
        types.float
        types.str
        types.path
        (types.attrsOf jsonValue)
        (types.listOf jsonValue)
      ]
    )
    // {
      description = "JSON value";
    };

  pkgs = rec {
    stdenv.hostPlatform.system = system;
    stdenv.buildPlatform.canExecute = platform: platform.system == system;
    formats.json =
      { }:
      {
        type = jsonValue;
        generate = name: value: writeText name (builtins.toJSON value);
      };
    writeText = name: text: sh name ''printf '%s' "$text" > "$out"'' { inherit text; };
    runCommand =
      name: env: script:
      sh name script (
        removeAttrs env [ "nativeBuildInputs" ]
        // {
          PATH = lib.makeBinPath (env.nativeBuildInputs or [ ]) + ":/usr/bin:/bin";
        }
      );
    roost-agent = sh "roost-agent-stub" ''
      mkdir -p "$out/bin"
      ln -s ${agentBin} "$out/bin/roost-agent"
    '' { };
    roost-coordinator = sh "roost-coordinator-stub" ''
      mkdir -p "$out/bin"
      ln -s ${coordinatorBin} "$out/bin/roost-coordinator"
    '' { };
    nix = sh "nix-stub" ''mkdir -p "$out/bin"'' { };
  };

  # systemd's unit settings: scalars, or lists that concatenate (NixOS's `unitOption`).
  unitValue = types.oneOf [
    types.bool
    types.int
    types.str
    (types.listOf types.str)
  ];

  unit =
    { ... }:
    {
      freeformType = types.attrsOf types.anything;
      options = {
        description = mkOption {
          type = types.str;
          default = "";
        };
        wants = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        after = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        wantedBy = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        path = mkOption {
          type = types.listOf types.package;
          default = [ ];
        };
        restartIfChanged = mkOption {
          type = types.bool;
          default = true;
        };
        stopIfChanged = mkOption {
          type = types.bool;
          default = true;
        };
        serviceConfig = mkOption {
          type = types.attrsOf unitValue;
          default = { };
        };
        timerConfig = mkOption {
          type = types.attrsOf unitValue;
          default = { };
        };
      };
    };

  nixosStub = {
    options = {
      assertions = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      warnings = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      meta.maintainers = mkOption {
        type = types.listOf types.raw;
        default = [ ];
      };
      networking.hostName = mkOption {
        type = types.str;
        default = "stubhost";
      };
      networking.firewall.allowedTCPPorts = mkOption {
        type = types.listOf types.port;
        default = [ ];
      };
      nix.package = mkOption {
        type = types.package;
        default = pkgs.nix;
      };
      environment.systemPackages = mkOption {
        type = types.listOf types.package;
        default = [ ];
      };
      environment.etc = mkOption {
        type = types.attrsOf (types.submodule { freeformType = types.attrsOf types.anything; });
        default = { };
      };
      systemd.services = mkOption {
        type = types.attrsOf (types.submodule unit);
        default = { };
      };
      systemd.timers = mkOption {
        type = types.attrsOf (types.submodule unit);
        default = { };
      };
      systemd.tmpfiles.rules = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      services.prometheus.exporters.node.enable = mkOption {
        type = types.bool;
        default = false;
      };
      services.prometheus.exporters.node.extraFlags = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
    };
    config._module.args.pkgs = pkgs;
  };

  evaluated = lib.evalModules {
    modules = [
      nixosStub
      ../nixos-module/default.nix
      configuration
    ];
  };
in
{
  inherit (evaluated) config options;
  inherit pkgs;
  # Each service's ExecStart in a file: building one realises every store path it names.
  execStart = lib.mapAttrs (
    name: unit: pkgs.writeText "${name}-exec-start" unit.serviceConfig.ExecStart
  ) evaluated.config.systemd.services;
  # The messages of the assertions that fail, as NixOS would refuse the system with.
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) evaluated.config.assertions);
}

# Evaluates examples/fleet's outputs without its inputs (no network here): nixpkgs is reduced
# to its `lib` with a stub `nixosSystem`, Home Manager to a stub `homeManagerConfiguration`,
# and roost's own `lib` (nix/lib.nix) runs on a stub `pkgs`. What comes out is the flake's
# real `deploy` output in structure, checked with `checkDeploy`, plus what the profiles and
# NixOS systems were given. tests/tests/nix_files.rs drives it.
{
  # nixpkgs' lib (`import <nixpkgs/lib>`).
  lib,
  flake ? ../examples/fleet/flake.nix,
}:

let
  stubDrv =
    system: name:
    derivation {
      inherit name system;
      builder = "/bin/sh";
    };

  stubPkgs = system: {
    inherit lib;
    runtimeShell = "/bin/sh";
    symlinkJoin = { name, paths }: stubDrv system name // { inherit paths; };
    writeTextFile = { name, text, ... }: stubDrv system name // { inherit text; };
    runCommand = name: _: _: stubDrv system name;
  };

  systems = [
    "x86_64-linux"
    "aarch64-linux"
  ];

  inputs = {
    self = outputs;
    nixpkgs = {
      lib = lib // {
        nixosSystem =
          args:
          {
            inherit args;
            config.system.build.toplevel = stubDrv args.system "nixos-system";
          };
      };
      legacyPackages = lib.genAttrs systems (system: {
        inherit system;
      });
    };
    home-manager.lib.homeManagerConfiguration = args: {
      inherit args;
      activationPackage = stubDrv args.pkgs.system "home-manager-generation";
    };
    roost = {
      lib =
        lib.genAttrs systems (system: import ./lib.nix { pkgs = stubPkgs system; })
        // {
          checkDeploy = import ./check-deploy.nix;
        };
      nixosModules.agent = ../nixos-module/agent.nix;
    };
  };

  outputs = (import flake).outputs inputs;
in
{
  problems = import ./check-deploy.nix outputs.deploy;
  nodes = lib.mapAttrs (_: node: {
    profiles = lib.mapAttrs (_: p: {
      path = p.path.name;
      user = p.user or "root";
    }) node.profiles;
    profilesOrder = node.profilesOrder or null;
  }) outputs.deploy.nodes;
  nixos = lib.mapAttrs (_: c: {
    inherit (c.args) system;
    agent = lib.elem ../nixos-module/agent.nix c.args.modules;
  }) outputs.nixosConfigurations;
  checks = lib.mapAttrs (_: lib.attrNames) outputs.checks;
}

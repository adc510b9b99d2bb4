{
  description = "An example fleet deployed with roost: two laptops and two Raspberry Pis";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    roost.url = "github:acme/roost";
    roost.inputs.nixpkgs.follows = "nixpkgs";
  };

  outputs = { self, nixpkgs, roost }:
    let
      # Every node trusts the CI's publisher key; its node key is pinned so only that node's
      # reports are believed. (Run `roost-agent key` on a node to print its key.)
      publisherKey = "acme-publisher-1:J8Gm0YDm7Tkl1b0x8yGV2hX9QaA6b8pN5YQ3Yk9nQ2c=";
      nodeKeys = import ./node-keys.nix;

      host = system: name: extra: nixpkgs.lib.nixosSystem {
        inherit system;
        modules = [
          roost.nixosModules.agent
          ./hosts/common.nix
          extra
          {
            networking.hostName = name;
            services.roost.agent = {
              enable = true;
              coordinators = [ "https://roost.acme.example" ];
              trustedKeys = [ publisherKey ];
            };
          }
        ];
      };

      # A Home Manager-style user profile: packages and dotfiles, activated by the link alone.
      homeFor = system: user: let pkgs = nixpkgs.legacyPackages.${system}; in
        pkgs.buildEnv {
          name = "home-${user}";
          paths = with pkgs; [ git ripgrep htop (writeTextDir "share/roost/motd" "managed by roost\n") ];
        };

      nodes = {
        laptop-alice = { system = "x86_64-linux"; config = host "x86_64-linux" "laptop-alice" ./hosts/laptop.nix; user = "alice"; };
        laptop-bob = { system = "x86_64-linux"; config = host "x86_64-linux" "laptop-bob" ./hosts/laptop.nix; user = "bob"; };
        pi-kitchen = { system = "aarch64-linux"; config = host "aarch64-linux" "pi-kitchen" ./hosts/pi.nix; user = "pi"; };
        pi-garage = { system = "aarch64-linux"; config = host "aarch64-linux" "pi-garage" ./hosts/pi.nix; user = "pi"; };
      };
    in
    {
      nixosConfigurations = builtins.mapAttrs (_: n: n.config) nodes;

      # deploy-rs's schema, unchanged; roost's own settings sit beside it under `roost`.
      deploy = {
        user = "root";
        activationTimeout = 300;
        confirmTimeout = 60;
        roost.healthChecks = [
          { kind = "command"; argv = [ "systemctl" "is-system-running" "--wait" ]; timeout_s = 120; }
        ];
        nodes = builtins.mapAttrs (name: n: {
          hostname = "${name}.lan"; # used by deploy-rs, ignored by roost
          roost.nodeKey = nodeKeys.${name};
          roost.wave = if nixpkgs.lib.hasPrefix "pi-" name then 1 else 0;
          profilesOrder = [ "system" "home" ];
          profiles = {
            system.path = roost.lib.${n.system}.activate.nixos n.config;
            home = {
              user = n.user;
              path = roost.lib.${n.system}.activate.noop (homeFor n.system n.user);
              roost.activation = { kind = "none"; };
              roost.healthChecks = [ ];
            };
          };
        }) nodes;
      };

      checks = builtins.mapAttrs (system: lib: { deploy = lib.deployChecks self.deploy; })
        { inherit (roost.lib) x86_64-linux aarch64-linux; };
    };
}

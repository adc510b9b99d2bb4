{
  description = "A household fleet deployed with roost: two laptops and two Raspberry Pis";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";
    home-manager = {
      url = "github:nix-community/home-manager/release-25.05";
      inputs.nixpkgs.follows = "nixpkgs";
    };
    # Where you get roost from; the same revision provides the agent module, the lib and the
    # `roost-coordinator` CI runs (`nix run --inputs-from . roost#roost-coordinator`).
    roost = {
      url = "git+https://example.invalid/roost";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      home-manager,
      roost,
    }:
    let
      inherit (nixpkgs) lib;
      keys = import ./keys.nix;

      # The machines: their architecture, their own modules and, for laptops, their owner.
      machines = {
        anna-laptop = {
          system = "x86_64-linux";
          modules = [ ./hosts/laptop.nix ];
          owner = "anna";
        };
        ben-laptop = {
          system = "x86_64-linux";
          modules = [ ./hosts/laptop.nix ];
          owner = "ben";
        };
        pi-kitchen = {
          system = "aarch64-linux";
          modules = [
            ./hosts/pi.nix
            ./hosts/pi-kitchen.nix
          ];
        };
        pi-garage = {
          system = "aarch64-linux";
          modules = [
            ./hosts/pi.nix
            ./hosts/pi-garage.nix
          ];
        };
      };

      activate = name: roost.lib.${machines.${name}.system}.activate;

      # A laptop's owner also gets their own Home Manager profile, deployed as them.
      home =
        name:
        home-manager.lib.homeManagerConfiguration {
          pkgs = nixpkgs.legacyPackages.${machines.${name}.system};
          modules = [ (import ./home.nix machines.${name}.owner) ];
        };

      # The system profile every node has.
      system = name: {
        path = (activate name).nixos self.nixosConfigurations.${name};
      };

      laptop = name: {
        # deploy-rs's SSH settings may stay; roost ignores them.
        hostname = "${name}.lan";
        roost.nodeKey = keys.nodes.${name};
        profilesOrder = [
          "system"
          "home"
        ];
        profiles = {
          system = system name;
          home = {
            user = machines.${name}.owner;
            path = (activate name).home-manager (home name);
            # A broken dotfile is not worth a rollback of the user's session: no checks.
            roost.healthChecks = [ ];
          };
        };
      };
    in
    {
      nixosConfigurations = lib.mapAttrs (
        name: m:
        lib.nixosSystem {
          inherit (m) system;
          specialArgs = {
            inherit keys;
            owner = m.owner or null;
          };
          modules = [
            roost.nixosModules.agent
            ./hosts/common.nix
            { networking.hostName = name; }
          ] ++ m.modules;
        }
      ) machines;

      # deploy-rs's schema, unchanged, with roost's own settings under `roost`. Precedence:
      # profile > node > this level.
      deploy = {
        # Who owns each profile and runs its activation (deploy-rs has no default: `user`,
        # else `sshUser`, else the profile is refused).
        user = "root";
        autoRollback = true;
        magicRollback = true;
        activationTimeout = 300;
        confirmTimeout = 60;
        # A deploy is confirmed only once systemd has settled with no failed unit.
        roost.healthChecks = [
          {
            kind = "command";
            argv = [
              "systemctl"
              "is-system-running"
              "--wait"
            ];
            timeout_s = 180;
          }
        ];

        nodes = {
          anna-laptop = laptop "anna-laptop";
          ben-laptop = laptop "ben-laptop";

          pi-kitchen = {
            hostname = "pi-kitchen.lan";
            roost.nodeKey = keys.nodes.pi-kitchen;
            # The Pis get a release after the laptops have taken it.
            roost.wave = 1;
            roost.healthChecks = [
              {
                kind = "command";
                argv = [
                  "systemctl"
                  "is-system-running"
                  "--wait"
                ];
                timeout_s = 300;
              }
              {
                kind = "command";
                argv = [
                  "systemctl"
                  "is-active"
                  "--quiet"
                  "mosquitto.service"
                ];
                timeout_s = 30;
              }
            ];
            profiles.system = system "pi-kitchen";
          };

          pi-garage = {
            hostname = "pi-garage.lan";
            roost.nodeKey = keys.nodes.pi-garage;
            roost.wave = 1;
            # An SD card is slow: give the switch more time.
            activationTimeout = 600;
            roost.healthChecks = [
              {
                kind = "http";
                url = "http://127.0.0.1:9100/metrics";
                timeout_s = 30;
              }
            ];
            profiles.system = system "pi-garage";
          };
        };
      };

      # `nix flake check`: the deploy output is well-formed for roost, and every profile
      # builds and has the activation it declares (builds the Pis too: CI emulates aarch64).
      checks.x86_64-linux = roost.lib.x86_64-linux.deployChecks self.deploy;
    };
}

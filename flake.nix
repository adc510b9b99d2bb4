{
  description = "roost: pull-based deployment for NixOS fleets — signed manifests, rollback, reports";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system:
        f (import nixpkgs { inherit system; overlays = [ self.overlays.default ]; }));
      roostLib = import ./nix/lib.nix { inherit (nixpkgs) lib; };
    in
    {
      overlays.default = final: _prev: {
        roost = final.callPackage ./nix/package.nix { };
        roost-agent = final.callPackage ./nix/package.nix { bin = "roost-agent"; };
        roost-coordinator = final.callPackage ./nix/package.nix { bin = "roost-coordinator"; };
      };

      packages = forAll (pkgs: {
        inherit (pkgs) roost-agent roost-coordinator;
        default = pkgs.roost;
      });

      apps = forAll (pkgs: {
        roost-agent = { type = "app"; program = "${pkgs.roost-agent}/bin/roost-agent"; };
        roost-coordinator = { type = "app"; program = "${pkgs.roost-coordinator}/bin/roost-coordinator"; };
        default = self.apps.${pkgs.system}.roost-coordinator;
      });

      nixosModules = {
        agent = { pkgs, lib, ... }: {
          imports = [ ./nixos-module/agent.nix ];
          services.roost.agent.package = lib.mkDefault self.packages.${pkgs.system}.roost-agent;
        };
        coordinator = { pkgs, lib, ... }: {
          imports = [ ./nixos-module/coordinator.nix ];
          services.roost.coordinator.package = lib.mkDefault self.packages.${pkgs.system}.roost-coordinator;
        };
        default = { imports = [ self.nixosModules.agent self.nixosModules.coordinator ]; };
      };

      # `roost.lib.validate deploy` (pure), and per system the activation helpers and
      # `deployChecks`, like deploy-rs's `lib.${system}`.
      lib = { inherit (roostLib) validate; } // forAll roostLib.forPkgs;

      checks = forAll (pkgs: {
        package = pkgs.roost;
        clippy = pkgs.roost.overrideAttrs (old: {
          pname = "roost-clippy";
          nativeBuildInputs = (old.nativeBuildInputs or [ ]) ++ [ pkgs.clippy ];
          buildPhase = "cargo clippy --workspace --all-targets --offline -- -D warnings";
          installPhase = "touch $out";
        });
        tests = pkgs.roost.overrideAttrs (_: {
          pname = "roost-tests";
          doCheck = true;
        });
        offline-fleet = (roostLib.forPkgs pkgs).deployChecks ((import ./examples/offline/flake.nix).outputs { self = { }; }).deploy;
      } // nixpkgs.lib.optionalAttrs (pkgs.system == "x86_64-linux") {
        vm-converge = import ./nix/tests/converge.nix { inherit pkgs self; };
        vm-rollback = import ./nix/tests/rollback.nix { inherit pkgs self; };
        vm-forged = import ./nix/tests/forged.nix { inherit pkgs self; };
      });
    };
}

{
  description = "roost: pull-based deployments for NixOS fleets that are often offline";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      # A NixOS module of this flake, with the package defaulting to this flake's build.
      withPackage =
        file: option: package:
        { lib, pkgs, ... }:
        {
          imports = [ file ];
          config.services.roost.${option}.package =
            lib.mkDefault
              self.packages.${pkgs.stdenv.hostPlatform.system}.${package};
        };
    in
    {
      packages = forAllSystems (
        _: pkgs: rec {
          roost-agent = pkgs.callPackage ./nix/package.nix { crate = "roost-agent"; };
          roost-coordinator = pkgs.callPackage ./nix/package.nix { crate = "roost-coordinator"; };
          default = pkgs.symlinkJoin {
            name = "roost-${roost-agent.version}";
            paths = [
              roost-agent
              roost-coordinator
            ];
            meta = roost-agent.meta // {
              description = "roost: pull-based deployments for NixOS fleets";
              mainProgram = "roost-coordinator";
            };
          };
        }
      );

      overlays.default = final: _prev: {
        roost-agent = final.callPackage ./nix/package.nix { crate = "roost-agent"; };
        roost-coordinator = final.callPackage ./nix/package.nix { crate = "roost-coordinator"; };
      };

      nixosModules = {
        agent = withPackage ./nixos-module/agent.nix "agent" "roost-agent";
        coordinator = withPackage ./nixos-module/coordinator.nix "coordinator" "roost-coordinator";
        default = {
          imports = [
            self.nixosModules.agent
            self.nixosModules.coordinator
          ];
        };
      };

      apps = forAllSystems (
        system: _:
        let
          app = name: {
            type = "app";
            program = "${self.packages.${system}.${name}}/bin/${name}";
            meta.description = self.packages.${system}.${name}.meta.description;
          };
        in
        {
          roost-agent = app "roost-agent";
          roost-coordinator = app "roost-coordinator";
          default = app "roost-coordinator";
        }
      );

      # deploy-rs's shape: `lib.${system}.activate.*` and `lib.${system}.deployChecks`, plus
      # the system-independent `lib.checkDeploy` (a list of problems, [ ] when fine).
      lib =
        forAllSystems (_: pkgs: import ./nix/lib.nix { inherit pkgs; })
        // {
          checkDeploy = import ./nix/check-deploy.nix;
        };

      checks = forAllSystems (
        system: pkgs:
        let
          packages = self.packages.${system};
          vmTest =
            file:
            pkgs.testers.runNixOSTest (
              import file {
                roost = self;
              }
            );
        in
        {
          inherit (packages) roost-agent roost-coordinator;

          tests = pkgs.callPackage ./nix/package.nix {
            crate = "roost-agent";
            withTests = true;
            # The module and example-fleet evaluations, as `.ci/run` runs them.
            nixpkgsLib = "${nixpkgs}/lib";
          };

          clippy = packages.roost-agent.overrideAttrs (old: {
            pname = "roost-clippy";
            nativeBuildInputs = old.nativeBuildInputs ++ [ pkgs.clippy ];
            buildPhase = ''
              runHook preBuild
              cargo clippy --workspace --all-targets --offline -- -D warnings
              runHook postBuild
            '';
            installPhase = "touch $out";
            doCheck = false;
          });

          fmt =
            pkgs.runCommand "roost-fmt"
              {
                nativeBuildInputs = [
                  pkgs.cargo
                  pkgs.rustfmt
                ];
              }
              ''
                cp -r ${packages.roost-agent.src} src && chmod -R u+w src && cd src
                cargo fmt --all --check
                touch $out
              '';

          # Every .nix file of the repository parses (nix-instantiate needs no store for that).
          nix-parse =
            pkgs.runCommand "roost-nix-parse"
              {
                nativeBuildInputs = [ pkgs.nix ];
              }
              ''
                export NIX_STATE_DIR=$TMPDIR/state NIX_LOG_DIR=$TMPDIR/log
                find ${self} -name '*.nix' -print0 | xargs -0 -n1 nix-instantiate --store dummy:// --parse > /dev/null
                touch $out
              '';

          # The NixOS VM tests (need KVM): a deploy that converges, a failing deploy that rolls
          # back, a forged manifest refused.
          vm-converge = vmTest ./nix/tests/converge.nix;
          vm-rollback = vmTest ./nix/tests/rollback.nix;
          vm-forged-manifest = vmTest ./nix/tests/forged-manifest.nix;
        }
      );

      formatter = forAllSystems (_: pkgs: pkgs.nixfmt-rfc-style);
    };
}

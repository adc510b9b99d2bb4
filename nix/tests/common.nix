# Shared by the NixOS VM tests: a coordinator VM, a node VM whose next systems are
# specialisations of itself (so they are in its store and the coordinator's, no cache needed),
# and a one-node fleet flake per generation for `roost-coordinator publish` to sign.
#
# The keys in ./keys are for these tests only: publisher.sec signs the manifests the node
# trusts; forged.sec has the same key *name* and a different secret, like an attacker would.
{ roost }:

let
  keys = ./keys;
in
rec {
  inherit keys;

  # The goal is `test`: a VM test has no boot loader to install, and `test` runs the same
  # activation, unit starts and exit codes as `switch`.
  activation = {
    kind = "nixos";
    goal = "test";
  };

  coordinator =
    { pkgs, nodes, ... }:
    {
      imports = [ roost.nixosModules.coordinator ];
      services.roost.coordinator = {
        enable = true;
        publisherKeys = [ "${keys}/publisher.pub" ];
        openFirewall = true;
        # The test reads /v1/fleet with plain curl.
        publicRead = true;
      };
      # publish evaluates a flake and reads path-info: the node's systems must be here.
      nix.settings = {
        experimental-features = [
          "nix-command"
          "flakes"
        ];
        flake-registry = builtins.toFile "empty-registry.json" ''{ "flakes": [ ], "version": 2 }'';
        substituters = pkgs.lib.mkForce [ ];
      };
      virtualisation.additionalPaths = map (g: systemOf nodes g) [
        "good"
        "bad"
      ];
      environment.systemPackages = [
        pkgs.curl
        pkgs.jq
      ];
    };

  # The node. `coordinatorUrl` is where its agent polls.
  machine =
    coordinatorUrl:
    { pkgs, lib, ... }:
    {
      imports = [ roost.nixosModules.agent ];
      services.roost.agent = {
        enable = true;
        coordinators = [ coordinatorUrl ];
        trustedKeys = [ "${keys}/publisher.pub" ];
        interval = "5s";
      };
      environment.systemPackages = [ pkgs.jq ];

      # The systems the fleet deploys: `good` runs an app that the health check asks about;
      # `bad` adds a unit that fails to start, so switch-to-configuration exits 4.
      specialisation.good.configuration = {
        environment.etc."roost-test-generation".text = "good";
        systemd.services.roost-test-app = {
          wantedBy = [ "multi-user.target" ];
          serviceConfig.ExecStart = "${pkgs.coreutils}/bin/sleep infinity";
        };
      };
      specialisation.bad.configuration = {
        environment.etc."roost-test-generation".text = "bad";
        systemd.services.roost-test-broken = {
          wantedBy = [ "multi-user.target" ];
          serviceConfig = {
            Type = "oneshot";
            ExecStart = "${pkgs.coreutils}/bin/false";
          };
        };
      };
      environment.etc."roost-test-generation".text = lib.mkDefault "initial";
    };

  # The toplevel of the node's specialisation `name`.
  systemOf = nodes: name: nodes.machine.specialisation.${name}.configuration.system.build.toplevel;

  # A fleet flake deploying specialisation `name` to the node, as plain store path strings
  # (`publish --no-build` checks they are in the store).
  fleet =
    pkgs: nodes: name:
    pkgs.writeTextDir "flake.nix" ''
      {
        outputs = { self }: {
          deploy.nodes.machine = {
            user = "root";
            roost.system = "${pkgs.stdenv.hostPlatform.system}";
            roost.activation = { kind = "${activation.kind}"; goal = "${activation.goal}"; };
            roost.healthChecks = [
              { kind = "command"; argv = [ "systemctl" "is-active" "--quiet" "roost-test-app.service" ]; timeout_s = 30; }
            ];
            activationTimeout = 120;
            profiles.system.path = "${systemOf nodes name}";
          };
        };
      }
    '';

  # Python for the test script: copy a fleet into a writable folder and publish it.
  publish =
    {
      flake,
      key ? "publisher",
      to ? "--to http://localhost:8080",
    }:
    ''rm -rf /tmp/fleet && cp -r ${flake} /tmp/fleet && chmod -R u+w /tmp/fleet && roost-coordinator publish /tmp/fleet --key ${keys}/${key}.sec ${to} --no-build --nodes-trust-paths --json >&2'';

  # Python: the node runs `name` (its /run/current-system and its system profile).
  runs = nodes: name: "[ $(readlink -f /run/current-system) = ${systemOf nodes name} ]";

  # Python: the node's system profile points at `name`.
  profileIs = nodes: name: "[ $(readlink -f /nix/var/nix/profiles/system) = ${systemOf nodes name} ]";
}

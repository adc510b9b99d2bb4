# A forged manifest is refused. The node polls a plain static web server (the `publish --out`
# layout), standing in for a compromised coordinator or CDN. A manifest signed with a key that
# has the publisher key's *name* but another secret is rejected by the agent, which keeps its
# system and records the rejection; the real coordinator refuses to store it at all. The same
# fleet signed with the real key then deploys, so the refusal was about the signature.
{ roost }:
{ hostPkgs, ... }:

let
  common = import ./common.nix { inherit roost; };
in
{
  name = "roost-forged-manifest";

  nodes = {
    coordinator =
      { pkgs, ... }:
      {
        imports = [ common.coordinator ];
        systemd.services.static-manifests = {
          wantedBy = [ "multi-user.target" ];
          preStart = "mkdir -p /srv/static";
          serviceConfig.ExecStart = "${pkgs.python3}/bin/python3 -m http.server 8000 --directory /srv/static";
        };
        networking.firewall.allowedTCPPorts = [ 8000 ];
      };
    machine = common.machine "http://coordinator:8000";
  };

  testScript =
    { nodes, ... }:
    let
      fleet = common.fleet hostPkgs nodes;
      static = "--out /srv/static";
    in
    ''
      start_all()
      coordinator.wait_for_unit("roost-coordinator.service")
      coordinator.wait_for_unit("static-manifests.service")
      coordinator.wait_for_open_port(8000)
      machine.wait_for_unit("roost-agent.service")
      profile_before = machine.succeed("readlink -f /nix/var/nix/profiles/system || true")

      with subtest("the coordinator refuses to store a forged manifest"):
          coordinator.fail("${common.publish { flake = fleet "good"; key = "forged"; }}")
          coordinator.fail("curl -sf http://localhost:8080/v1/nodes/machine/manifest")

      with subtest("the agent rejects a forged manifest from the static host"):
          coordinator.succeed("${common.publish { flake = fleet "good"; key = "forged"; to = static; }}")
          coordinator.succeed("test -s /srv/static/v1/nodes/machine/manifest")
          machine.wait_until_succeeds(
              "roost-agent status --json | jq -e '.last_deploy.state == \"rejected\"'", timeout=120
          )
          machine.fail("${common.runs nodes "good"}")
          profile = machine.succeed("readlink -f /nix/var/nix/profiles/system || true")
          assert profile == profile_before, f"the system profile changed: {profile_before!r} -> {profile!r}"
          machine.fail("grep -qx good /etc/roost-test-generation")

      with subtest("the same fleet signed by the publisher deploys"):
          coordinator.succeed("${common.publish { flake = fleet "good"; to = static; }}")
          machine.wait_until_succeeds("${common.runs nodes "good"}", timeout=300)
          machine.wait_until_succeeds(
              "roost-agent status --json | jq -e '.last_deploy.state == \"success\"'", timeout=120
          )
    '';
}

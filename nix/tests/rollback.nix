# A failing deploy rolls back: after a good generation, the fleet publishes one with a unit
# that fails to start. switch-to-configuration exits 4, the agent points the system profile
# back at the exact previous generation, re-activates it, quarantines the version and reports
# `rolled_back`.
{ roost }:
{ hostPkgs, ... }:

let
  common = import ./common.nix { inherit roost; };
in
{
  name = "roost-rollback";

  nodes = {
    coordinator = common.coordinator;
    machine = common.machine "http://coordinator:8080";
  };

  testScript =
    { nodes, ... }:
    let
      fleet = common.fleet hostPkgs nodes;
      status = field: value: "roost-agent status --json | jq -e '${field} == \\\"${value}\\\"'";
    in
    ''
      start_all()
      coordinator.wait_for_unit("roost-coordinator.service")
      coordinator.wait_for_open_port(8080)
      machine.wait_for_unit("roost-agent.service")

      with subtest("the good generation is deployed first"):
          coordinator.succeed("${common.publish { flake = fleet "good"; }}")
          machine.wait_until_succeeds("${common.runs nodes "good"}", timeout=300)
          machine.wait_until_succeeds("${status ".last_deploy.state" "success"}", timeout=120)
          good_generation = machine.succeed("readlink /nix/var/nix/profiles/system").strip()

      with subtest("the bad generation fails to activate and is rolled back"):
          coordinator.succeed("${common.publish { flake = fleet "bad"; }}")
          machine.wait_until_succeeds("${status ".last_deploy.state" "rolled_back"}", timeout=300)
          machine.succeed("${common.runs nodes "good"}")
          machine.succeed("${common.profileIs nodes "good"}")
          link = machine.succeed("readlink /nix/var/nix/profiles/system").strip()
          assert link == good_generation, f"profile points at {link}, not the previous {good_generation}"
          machine.succeed("grep -qx good /etc/roost-test-generation")
          machine.succeed("systemctl is-active roost-test-app.service")
          machine.fail("systemctl is-active roost-test-broken.service")

      with subtest("the failed version is quarantined and reported"):
          machine.succeed("roost-agent status --json | jq -e '.quarantined | length >= 1'")
          coordinator.wait_until_succeeds(
              "curl -sf http://localhost:8080/v1/fleet"
              + " | jq -e '.nodes[] | select(.node == \"machine\") | .state == \"rolled_back\"'",
              timeout=120,
          )

      with subtest("the agent survived its own failed deploy"):
          machine.succeed("systemctl is-active roost-agent.service")
    '';
}

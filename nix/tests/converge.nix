# A deploy that converges: CI publishes a signed manifest to the coordinator; the node's
# agent picks it up (long-poll), switches to the new system, passes its health check and
# reports success, which the coordinator's fleet view shows.
{ roost }:
{ hostPkgs, ... }:

let
  common = import ./common.nix { inherit roost; };
in
{
  name = "roost-converge";

  nodes = {
    coordinator = common.coordinator;
    machine = common.machine "http://coordinator:8080";
  };

  testScript =
    { nodes, ... }:
    let
      fleet = common.fleet hostPkgs nodes;
    in
    ''
      start_all()
      coordinator.wait_for_unit("roost-coordinator.service")
      coordinator.wait_for_open_port(8080)
      machine.wait_for_unit("roost-agent.service")
      machine.succeed("roost-agent status")
      agent_pid = machine.succeed("systemctl show -p MainPID --value roost-agent.service").strip()

      with subtest("nothing is deployed before a publish"):
          machine.fail("${common.runs nodes "good"}")

      with subtest("publish signs and uploads the node's manifest"):
          coordinator.succeed("${common.publish { flake = fleet "good"; }}")

      with subtest("the node switches to the published system and is healthy"):
          machine.wait_until_succeeds("${common.runs nodes "good"}", timeout=300)
          machine.succeed("grep -qx good /etc/roost-test-generation")
          machine.succeed("systemctl is-active roost-test-app.service")
          machine.wait_until_succeeds(
              "roost-agent status --json | jq -e '.last_deploy.state == \"success\"'", timeout=120
          )
          machine.succeed("${common.profileIs nodes "good"}")

      with subtest("the switch the agent performed did not stop or restart the agent"):
          pid = machine.succeed("systemctl show -p MainPID --value roost-agent.service").strip()
          assert pid == agent_pid, f"roost-agent was restarted: MainPID {agent_pid} -> {pid}"

      with subtest("the coordinator shows the node's success report"):
          coordinator.wait_until_succeeds(
              "curl -sf http://localhost:8080/v1/fleet"
              + " | jq -e '.nodes[] | select(.node == \"machine\") | .state == \"success\"'",
              timeout=120,
          )
    '';
}

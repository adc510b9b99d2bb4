# A deploy that converges: publish a profile with a health check, the node switches to it.
{ pkgs, self }:
let c = import ./common.nix { inherit pkgs self; }; in
pkgs.testers.runNixOSTest {
  name = "roost-converge";
  nodes = { coordinator = c.coordinator; node = c.node; };
  testScript = ''
    start_all()
    coordinator.wait_for_unit("roost-coordinator.service")
    node.wait_for_unit("roost-agent.service")
    coordinator.succeed("mkdir -p /tmp/fleet && cp -r ${./fleet}/* /tmp/fleet/")
    coordinator.succeed(
      "ROOST_UPLOAD_TOKEN=$(cat /etc/roost-token) roost-coordinator publish /tmp/fleet "
      "--key ${c.keys}/publisher.sec --to http://localhost:8080 --cache http://localhost:8080/cache "
      "--cache-key ${c.keys}/publisher.sec --substituter http://coordinator:8080/cache"
    )
    node.wait_until_succeeds("roost-agent status --json | grep -q '\"state\": \"success\"'", timeout=120)
    node.succeed("test -e /nix/var/nix/profiles/per-user/root/hello")
    coordinator.succeed("roost-coordinator status --coordinator http://localhost:8080")
  '';
}

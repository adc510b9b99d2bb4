# A failing deploy rolls back: the profile's activation exits 1; the node returns to the
# exact previous generation and reports rolled_back.
{ pkgs, self }:
let c = import ./common.nix { inherit pkgs self; }; in
pkgs.testers.runNixOSTest {
  name = "roost-rollback";
  nodes = { coordinator = c.coordinator; node = c.node; };
  testScript = ''
    start_all()
    coordinator.wait_for_unit("roost-coordinator.service")
    node.wait_for_unit("roost-agent.service")
    coordinator.succeed("mkdir -p /tmp/fleet && cp -r ${./fleet}/* /tmp/fleet/ && chmod -R u+w /tmp/fleet")
    publish = (
      "ROOST_UPLOAD_TOKEN=$(cat /etc/roost-token) roost-coordinator publish /tmp/fleet "
      "--key ${c.keys}/publisher.sec --to http://localhost:8080 --cache http://localhost:8080/cache "
      "--cache-key ${c.keys}/publisher.sec --substituter http://coordinator:8080/cache"
    )
    coordinator.succeed(publish)
    node.wait_until_succeeds("roost-agent status --json | grep -q '\"state\": \"success\"'", timeout=120)
    before = node.succeed("readlink /nix/var/nix/profiles/per-user/root/hello")
    coordinator.succeed("sed -i 's/fail = false/fail = true/' /tmp/fleet/flake.nix")
    coordinator.succeed(publish)
    node.wait_until_succeeds("roost-agent status --json | grep -q '\"state\": \"rolled_back\"'", timeout=120)
    after = node.succeed("readlink /nix/var/nix/profiles/per-user/root/hello")
    assert before == after, f"not back at the exact generation: {before} != {after}"
  '';
}

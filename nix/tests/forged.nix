# A forged manifest is refused: signed by an untrusted key, applied by hand; nothing changes.
{ pkgs, self }:
let c = import ./common.nix { inherit pkgs self; }; in
pkgs.testers.runNixOSTest {
  name = "roost-forged";
  nodes = { coordinator = c.coordinator; node = c.node; };
  testScript = ''
    start_all()
    coordinator.wait_for_unit("roost-coordinator.service")
    coordinator.succeed("mkdir -p /tmp/fleet && cp -r ${./fleet}/* /tmp/fleet/")
    coordinator.succeed("roost-coordinator publish /tmp/fleet --key ${c.keys}/evil.sec --out /tmp/forged")
    node.wait_for_unit("roost-agent.service")
    node.copy_from_host("${c.keys}", "/tmp/keys")
    coordinator.copy_from_vm("/tmp/forged/v1/nodes/node/manifest", "forged")
    node.copy_from_host("forged/manifest", "/tmp/forged-manifest")
    state = node.succeed("cat /var/lib/roost/state.json || true")
    node.fail("roost-agent apply /tmp/forged-manifest --config $(systemctl show -p ExecStart roost-agent | grep -o '/nix/store/[^ ]*config.json')")
    assert state == node.succeed("cat /var/lib/roost/state.json || true")
  '';
}

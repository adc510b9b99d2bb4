{
  description = "roost's offline fixture fleet: no inputs, builds offline in milliseconds";

  # Used by the README demo and the end-to-end tests. Three nodes in deploy-rs's schema with
  # roost's own keys beside it. `settings.nix` is the knob: bump `generation` for a new version,
  # give a node a `behaviour` to make its deploy fail, hang or turn unhealthy.
  outputs = { self }:
    let
      settings = import ./settings.nix;
      fixtures = import ./fixtures.nix { inherit (settings) system; };
      behaviour = node: settings.behaviour.${node} or "ok";
      blob = node: settings.blobKiB.${node} or 0;
      # roost.nodeKey pins the key a node signs its reports with; null: trust on first use.
      nodeKey = node: (settings.nodeKeys or { }).${node} or null;
      # roost.reboot, from settings.nix; null: the default ("never").
      reboot = node: (settings.reboot or { }).${node} or null;
      rebootWindow = node: (settings.rebootWindow or { }).${node} or null;
      # The system's own health script, plus any HTTP checks settings.nix asks for.
      checks = node:
        [ { kind = "command"; argv = [ "/nix/var/nix/profiles/system/bin/health" ]; timeout_s = 10; } ]
        ++ map (url: { kind = "http"; inherit url; timeout_s = 2; }) (settings.httpChecks.${node} or [ ]);
      system = node: fixtures.fakeSystem {
        inherit node;
        inherit (settings) generation;
        behaviour = behaviour node;
        blobKiB = blob node;
        kernel = (settings.kernel or { }).${node} or null;
        systemd = (settings.systemd or { }).${node} or null;
      };
    in
    {
      deploy = {
        # deploy-level settings (lowest precedence)
        user = "root";
        activationTimeout = 20;
        confirmTimeout = 15;
        sshUser = "ignored-by-roost";
        roost.healthChecks = checks "laptop";

        nodes = {
          laptop = {
            hostname = "laptop.lan";
            roost.nodeKey = nodeKey "laptop";
            roost.reboot = reboot "laptop";
            roost.rebootWindow = rebootWindow "laptop";
            # node-level settings override deploy-level ones
            magicRollback = true;
            profilesOrder = [ "system" "home" ];
            profiles = {
              system.path = system "laptop";
              home = {
                path = fixtures.userProfile { node = "laptop"; inherit (settings) generation; };
                # profile-level settings override everything; a plain package profile
                roost.activation = { kind = "none"; };
                roost.healthChecks = [ ];
              };
            };
          };

          pi-kitchen = {
            hostname = "pi-kitchen.lan";
            roost.nodeKey = nodeKey "pi-kitchen";
            roost.reboot = reboot "pi-kitchen";
            roost.rebootWindow = rebootWindow "pi-kitchen";
            roost.wave = 1;
            roost.healthChecks = checks "pi-kitchen";
            profiles.system.path = system "pi-kitchen";
          };

          pi-garage = {
            hostname = "pi-garage.lan";
            roost.nodeKey = nodeKey "pi-garage";
            roost.reboot = reboot "pi-garage";
            roost.rebootWindow = rebootWindow "pi-garage";
            roost.wave = 1;
            roost.healthChecks = checks "pi-garage";
            profiles.system = {
              path = system "pi-garage";
              activationTimeout = 10;
            };
          };
        };
      };
    };
}

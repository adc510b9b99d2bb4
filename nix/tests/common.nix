# Shared by the VM tests: a coordinator node, a fleet node with the agent, keys, and a
# publish of a tiny system-like profile straight into the coordinator.
{ pkgs, self }:
rec {
  roost = self.packages.${pkgs.system}.default;
  keys = pkgs.runCommand "roost-test-keys" { nativeBuildInputs = [ roost ]; } ''
    mkdir $out
    roost-coordinator keygen test-publisher-1 --secret-file $out/publisher.sec --public-file $out/publisher.pub
    roost-coordinator keygen evil-1 --secret-file $out/evil.sec --public-file $out/evil.pub
    echo 0123456789abcdef0123456789abcdef > $out/token
  '';
  coordinator = { ... }: {
    imports = [ self.nixosModules.coordinator ];
    services.roost.coordinator = {
      enable = true;
      package = roost;
      publisherKeys = [ "${keys}/publisher.pub" ];
      uploadTokenFile = "/etc/roost-token";
      openFirewall = true;
    };
    environment.etc."roost-token".source = "${keys}/token";
    environment.systemPackages = [ roost ];
  };
  node = { ... }: {
    imports = [ self.nixosModules.agent ];
    services.roost.agent = {
      enable = true;
      package = roost;
      coordinators = [ "http://coordinator:8080" ];
      trustedKeys = [ "${keys}/publisher.pub" ];
      interval = "5s";
    };
    nix.settings.experimental-features = [ "nix-command" "flakes" ];
  };
}

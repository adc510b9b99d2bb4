# Every machine of the fleet: the roost agent, pulling from the coordinator and trusting the
# fleet's publisher key, plus what an admin needs to get in when something is off.
{ keys, ... }:
{
  services.roost.agent = {
    enable = true;
    coordinators = [ "https://roost.example.org" ];
    trustedKeys = [ keys.publisher ];
  };

  nix.settings.experimental-features = [
    "nix-command"
    "flakes"
  ];
  # Old generations are the rollback targets; keep a few weeks of them.
  nix.gc = {
    automatic = true;
    options = "--delete-older-than 30d";
  };

  services.openssh = {
    enable = true;
    settings.PasswordAuthentication = false;
  };
  users.users.root.openssh.authorizedKeys.keys = [
    # Replace with your own.
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAqkK3xQ8Vf2m3rCkH7kXwqkQ4zjvN8sYJbJ7gWmFq2T admin@acme"
  ];

  time.timeZone = "Europe/Berlin";
  system.stateVersion = "25.05";
}

{ pkgs, ... }:
{
  nix.settings = {
    experimental-features = [ "nix-command" "flakes" ];
    # The fleet's cache; the agent also passes the signed manifest's substituters.
    substituters = [ "https://roost.acme.example/cache" ];
    trusted-public-keys = [ "acme-cache-1:Qm9vc3QgY2FjaGUga2V5IGZvciB0aGUgZXhhbXBsZSE=" ];
  };
  services.openssh.enable = true;
  time.timeZone = "Europe/Berlin";
  environment.systemPackages = [ pkgs.vim ];
  system.stateVersion = "25.05";
}

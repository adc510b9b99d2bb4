{ ... }:
{
  boot.loader.grub.enable = false;
  boot.loader.generic-extlinux-compatible.enable = true;
  fileSystems."/" = { device = "/dev/disk/by-label/NIXOS_SD"; fsType = "ext4"; };
  # Pis behind a home router: never build locally, only substitute.
  services.roost.agent.buildPolicy = "substitute-only";
  services.roost.agent.settings.extra_substituters = [ "https://roost.acme.example/cache" ];
}

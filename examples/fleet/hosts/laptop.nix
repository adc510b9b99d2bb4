{ ... }:
{
  boot.loader.systemd-boot.enable = true;
  fileSystems."/" = { device = "/dev/disk/by-label/nixos"; fsType = "ext4"; };
  networking.networkmanager.enable = true;
  services.xserver.enable = false;
  # Laptops sleep: the agent polls soon after resume and long-polls while awake.
  services.roost.agent.interval = "10min";
}

# A user's own profile (Home Manager), deployed by roost as that user beside the system.
user:
{ pkgs, ... }:
{
  home.username = user;
  home.homeDirectory = "/home/${user}";
  home.stateVersion = "25.05";

  home.packages = [
    pkgs.ripgrep
    pkgs.jq
  ];
  programs.bash.enable = true;
  programs.git = {
    enable = true;
    userName = user;
    userEmail = "${user}@example.org";
  };
}

# Both roost modules: `services.roost.agent` and `services.roost.coordinator`. Each is off
# until enabled.
{
  imports = [
    ./agent.nix
    ./coordinator.nix
  ];
}

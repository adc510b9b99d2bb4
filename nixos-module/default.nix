# Both roost modules; `package` defaults come from the flake's overlay when it is applied.
{ ... }:
{
  imports = [ ./agent.nix ./coordinator.nix ];
}

# The VM tests' fleet: one node, one profile whose activation can be made to fail.
{
  outputs = { self }:
    let
      system = "x86_64-linux";
      fail = false;
    in {
      deploy.nodes.node = {
        hostname = "node";
        profiles.hello = {
          path = derivation {
            name = "hello-profile"; inherit system; builder = "/bin/sh"; PATH = "/run/current-system/sw/bin";
            args = [ "-c" "mkdir -p $out/bin; printf '#!/bin/sh\\nexit ${if fail then "1" else "0"}\\n' > $out/bin/activate; chmod +x $out/bin/activate" ];
          };
          roost.activation = { kind = "command"; argv = [ "bin/activate" ]; };
        };
      };
    };
}

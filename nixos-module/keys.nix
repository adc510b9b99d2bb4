# Public keys given either inline (`name:base64`, as `nix-store --generate-binary-cache-key`
# and `roost-coordinator keygen` print them) or as files. roost's programs take key *files*;
# inline keys are written into the Nix store, which is fine for public keys and only for them.
{ lib, pkgs }:

let
  # Nix's key format: a name without `:` or whitespace, a colon, standard base64.
  inlinePattern = "[^:/[:space:]][^:[:space:]]*:[A-Za-z0-9+/]+={0,2}";
in
{
  # An element of a key list: an inline public key, or an absolute path to a key file.
  keyType = lib.types.either lib.types.path (lib.types.strMatching inlinePattern);

  # Key files for a list of keys, inline ones written to the store. `what` names the files.
  keyFiles =
    what: keys:
    lib.imap1 (
      i: k:
      if builtins.isString k && builtins.match inlinePattern k != null then
        pkgs.writeText "roost-${what}-${toString i}-${
          lib.strings.sanitizeDerivationName (builtins.head (lib.splitString ":" k))
        }.pub" k
      else
        # A path literal is copied into the store here (public keys only); a string is the
        # file's location on the machine.
        "${k}"
    ) keys;
}

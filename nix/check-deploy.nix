# Checks a flake's `deploy` output (deploy-rs's schema plus roost's `roost.*` keys, DESIGN.md
# §4) and returns its problems: a list of messages, each naming where (`deploy.nodes.NODE.
# profiles.PROFILE.KEY`) and what is wrong; [ ] when it is fine. Builtins only, so it runs
# without nixpkgs; it never forces a profile's build, only whether `path` is a derivation or a
# store path. `roost-coordinator publish` applies the same rules; this finds mistakes at
# `nix flake check` time instead.
deploy:

let
  inherit (builtins)
    all
    attrNames
    concatLists
    concatStringsSep
    elem
    filter
    genList
    head
    isAttrs
    isBool
    isInt
    isList
    isString
    length
    match
    substring
    stringLength
    toJSON
    typeOf
    ;

  show =
    v:
    if isString v then
      toJSON (builtins.unsafeDiscardStringContext v)
    else if isAttrs v && v.type or null == "derivation" then
      "a derivation"
    else if isAttrs v || isList v then
      "a ${typeOf v}"
    else
      toJSON v;

  nameOk = max: n: match "[A-Za-z0-9._+-]+" n != null && stringLength n <= max && n != "." && n != "..";
  # Nix's key format: NAME:base64 of 32 bytes.
  publicKeyOk = k: isString k && match "[^:[:space:]]+:[A-Za-z0-9+/]{43}=" k != null;
  isStorePath =
    p:
    isString p
    && match "${builtins.storeDir}/[0123456789abcdfghijklmnpqrsvwxyz]{32}-[^/]+" (builtins.unsafeDiscardStringContext p) != null;
  hasDotDot = p: elem ".." (filter isString (builtins.split "/" p));

  # A null setting is an absent one (publish reads it so), e.g. `roost.nodeKey = null` for
  # trust on first use.
  present = a: builtins.removeAttrs a (filter (k: a.${k} == null) (attrNames a));

  # Each check: where -> value -> [ problem ].
  expect = ok: what: where: v: if ok v then [ ] else [ "${where}: expected ${what}, got ${show v}" ];
  str = expect isString "a string";
  bool = expect isBool "true or false";
  seconds = expect (v: isInt v && v >= 0) "a whole number of seconds";

  # Keys of `a` that are not in `known`.
  unknown =
    where: known: a:
    map (k: "${where}.${k}: unknown key (known: ${concatStringsSep ", " known})") (
      filter (k: !elem k known) (attrNames a)
    );

  checkHealth =
    where: h:
    if !isAttrs h then
      [ "${where}: expected { kind = \"command\"; argv = [ … ]; } or { kind = \"http\"; url = \"…\"; }, got ${show h}" ]
    else if h.kind or null == "command" then
      unknown where [ "kind" "argv" "timeout_s" ] h
      ++ expect (a: isList a && a != [ ] && all isString a) "a non-empty list of strings" "${where}.argv" (
        h.argv or null
      )
      ++ (if h ? timeout_s then expect (t: isInt t && t > 0) "a positive number of seconds" "${where}.timeout_s" h.timeout_s else [ ])
    else if h.kind or null == "http" then
      unknown where [ "kind" "url" "timeout_s" ] h
      ++ expect (u: isString u && match "https?://.+" u != null) "an http:// or https:// URL" "${where}.url" (
        h.url or null
      )
      ++ (if h ? timeout_s then expect (t: isInt t && t > 0) "a positive number of seconds" "${where}.timeout_s" h.timeout_s else [ ])
    else
      [ "${where}.kind: expected \"command\" or \"http\", got ${show (h.kind or null)}" ];

  checkActivation =
    where: a:
    if !isAttrs a then
      [ "${where}: expected { kind = \"nixos\" | \"deploy-rs\" | \"command\" | \"none\"; … }, got ${show a}" ]
    else if a.kind or null == "nixos" then
      unknown where [ "kind" "goal" ] a
      ++ (
        if a ? goal then
          expect (g: elem g [ "switch" "boot" "test" ]) "\"switch\", \"boot\" or \"test\"" "${where}.goal" a.goal
        else
          [ ]
      )
    else if elem (a.kind or null) [ "deploy-rs" "none" ] then
      unknown where [ "kind" ] a
    else if a.kind or null == "command" then
      unknown where [ "kind" "argv" ] a
      ++ (
        let
          argv = a.argv or null;
        in
        if !(isList argv && argv != [ ] && all isString argv) then
          [ "${where}.argv: expected a non-empty list of strings, got ${show argv}" ]
        else if substring 0 1 (head argv) == "/" || hasDotDot (head argv) then
          [ "${where}.argv: the program ${show (head argv)} must be relative to the profile's path, without `..`" ]
        else
          [ ]
      )
    else
      [ "${where}.kind: expected \"nixos\", \"deploy-rs\", \"command\" or \"none\", got ${show (a.kind or null)}" ];

  # `deploy.roost.rollout`: how a coordinator releases a publish wave by wave.
  checkRollout =
    where: r':
    let
      r = present r';
    in
    if !isAttrs r' then
      [ "${where}: expected an attribute set { minHealthy; maxFailed; bakeTime; }, got ${show r'}" ]
    else
      unknown where [ "minHealthy" "maxFailed" "bakeTime" ] r
      ++ (
        if r ? minHealthy then
          expect (f: (isInt f || builtins.isFloat f) && f >= 0 && f <= 1) "a number from 0 to 1" "${where}.minHealthy" r.minHealthy
        else
          [ ]
      )
      ++ (if r ? maxFailed then expect (n: isInt n && n >= 0) "a whole number of nodes" "${where}.maxFailed" r.maxFailed else [ ])
      ++ (
        if r ? bakeTime then
          expect (d: isString d || isInt d && d >= 0) "a duration such as \"10min\" or whole seconds" "${where}.bakeTime" r.bakeTime
        else
          [ ]
      );

  # roost's own keys; `level` is "deploy", "node" or "profile".
  checkRoost =
    level: where: r':
    let
      r = present r';
    in
    if !isAttrs r' then
      [ "${where}: expected an attribute set, got ${show r'}" ]
    else
      unknown where [ "nodeKey" "system" "healthChecks" "activation" "wave" "rollout" "applyWindow" "reboot" "rebootWindow" ] r
      ++ (
        if r ? nodeKey then
          if level == "profile" then
            [ "${where}.nodeKey: belongs to the node (or deploy), not to a profile" ]
          else
            expect publicKeyOk "a public key \"name:base64\" (`roost-agent key` prints it)" "${where}.nodeKey" r.nodeKey
        else
          [ ]
      )
      ++ (if r ? system then str "${where}.system" r.system else [ ])
      ++ (
        if r ? applyWindow then
          expect (
            w: isString w || (isList w && all isString w)
          ) "a window like \"Mon-Fri 12:00-13:00\", or a list of them" "${where}.applyWindow" r.applyWindow
        else
          [ ]
      )
      ++ (
        if r ? rebootWindow then
          expect (
            w: isString w || (isList w && all isString w)
          ) "a window like \"Sat 02:00-05:00\", or a list of them" "${where}.rebootWindow" r.rebootWindow
        else
          [ ]
      )
      ++ (
        if r ? reboot then
          expect (p: builtins.elem p [ "never" "window" "auto" ]) "\"never\", \"window\" or \"auto\"" "${where}.reboot" r.reboot
        else
          [ ]
      )
      ++ (
        if r ? wave then
          if level == "profile" then
            [ "${where}.wave: belongs to the node (or deploy), not to a profile" ]
          else
            expect (w: isInt w && w >= 0) "a whole number (0 goes first)" "${where}.wave" r.wave
        else
          [ ]
      )
      ++ (
        if r ? rollout then
          if level != "deploy" then
            [ "${where}.rollout: belongs to deploy (one policy per publish), not to a ${level}" ]
          else
            checkRollout "${where}.rollout" r.rollout
        else
          [ ]
      )
      ++ (
        if r ? healthChecks then
          if isList r.healthChecks then
            concatLists (
              genList (i: checkHealth "${where}.healthChecks.${toString i}" (builtins.elemAt r.healthChecks i)) (
                length r.healthChecks
              )
            )
          else
            [ "${where}.healthChecks: expected a list, got ${show r.healthChecks}" ]
        else
          [ ]
      )
      ++ (if r ? activation then checkActivation "${where}.activation" r.activation else [ ]);

  # The generic settings deploy-rs reads at every level (SSH-only ones are not roost's business).
  checkSettings =
    level: where: s':
    let
      s = present s';
    in
    (if s ? user then str "${where}.user" s.user else [ ])
    ++ (if s ? sshUser then str "${where}.sshUser" s.sshUser else [ ])
    ++ (
      if s ? profilePath && level != "profile" then
        [ "${where}.profilePath: read per profile only (deploy-rs ignores it at this level; two profiles would share one link)" ]
      else if s ? profilePath then
        if isString s.profilePath && substring 0 1 s.profilePath == "/" && !hasDotDot s.profilePath then
          [ ]
        else
          [ "${where}.profilePath: expected an absolute path without `..`, got ${show s.profilePath}" ]
      else
        [ ]
    )
    ++ (if s ? autoRollback then bool "${where}.autoRollback" s.autoRollback else [ ])
    ++ (if s ? magicRollback then bool "${where}.magicRollback" s.magicRollback else [ ])
    ++ (if s ? activationTimeout then seconds "${where}.activationTimeout" s.activationTimeout else [ ])
    ++ (if s ? confirmTimeout then seconds "${where}.confirmTimeout" s.confirmTimeout else [ ])
    ++ (if s ? roost then checkRoost level "${where}.roost" s.roost else [ ]);

  checkProfile =
    where: name: p:
    (if nameOk 64 name then [ ] else [ "${where}: the profile name must be 1 to 64 of [A-Za-z0-9._+-]" ])
    ++ (
      if !isAttrs p then
        [ "${where}: expected an attribute set with `path`, got ${show p}" ]
      else
        (
          if !(p ? path) then
            [ "${where}.path: missing" ]
          else if isAttrs p.path && p.path.type or null == "derivation" || isStorePath p.path then
            [ ]
          else
            [ "${where}.path: expected a derivation or a store path, got ${show p.path}" ]
        )
        ++ checkSettings "profile" where p
    );

  checkNode =
    where: name: n:
    (if nameOk 253 name then [ ] else [ "${where}: the node name must be 1 to 253 of [A-Za-z0-9._+-]" ])
    ++ (
      if !isAttrs n then
        [ "${where}: expected an attribute set, got ${show n}" ]
      else if !(isAttrs (n.profiles or null)) || n.profiles == { } then
        [ "${where}.profiles: expected at least one profile" ]
      else
        checkSettings "node" where n
        ++ concatLists (map (p: checkProfile "${where}.profiles.${p}" p n.profiles.${p}) (attrNames n.profiles))
        # deploy-rs: `user`, else `sshUser` (any level), else it refuses the profile.
        ++ map (p: "${where}.profiles.${p}: neither `user` nor `sshUser` is set at any level") (
          filter (
            p:
            let
              levels = map present (filter isAttrs [ n.profiles.${p} n deploy ]);
            in
            !(builtins.any (l: l ? user || l ? sshUser) levels)
          ) (attrNames n.profiles)
        )
        ++ (
          if n ? profilesOrder then
            if isList n.profilesOrder && all isString n.profilesOrder then
              map (p: "${where}.profilesOrder: names `${p}`, which is not in `profiles`") (
                filter (p: !(n.profiles ? ${p})) n.profilesOrder
              )
              ++ (
                if length n.profilesOrder == length (attrNames (builtins.listToAttrs (map (p: { name = p; value = null; }) n.profilesOrder))) then
                  [ ]
                else
                  [ "${where}.profilesOrder: names a profile twice" ]
              )
            else
              [ "${where}.profilesOrder: expected a list of profile names, got ${show n.profilesOrder}" ]
          else
            [ ]
        )
    );
in
if !isAttrs deploy then
  [ "deploy: expected an attribute set, got ${show deploy}" ]
else if !(isAttrs (deploy.nodes or null)) then
  [ "deploy.nodes: expected an attribute set of nodes" ]
else
  checkSettings "deploy" "deploy" deploy
  ++ concatLists (map (n: checkNode "deploy.nodes.${n}" n deploy.nodes.${n}) (attrNames deploy.nodes))

# Evaluates one of the project's NixOS modules without nixpkgs, for the
# tests: a small stand-in for the parts of `lib` and `pkgs` the modules
# use, the options' defaults with `settings` merged over them, and the
# module's config with mkIf/mkMerge resolved (mkForce is kept, so a test
# can see that something is forced). Prints what the test asks for.
{ module, settings ? { }, hydra ? null }:
let
  inherit (builtins) isAttrs isList mapAttrs foldl' elemAt length filter split;
  lib = rec {
    mkOption = o: o // { _type = "option"; };
    mkEnableOption = _: mkOption { default = false; };
    types = let t = { }; f = _: t; in {
      str = t; bool = t; path = t; package = t; port = t; lines = t;
      ints = { positive = t; unsigned = t; };
      float = t; nullOr = f; listOf = f; nonEmptyListOf = f; attrsOf = f; enum = f;
    };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    mkForce = content: { _type = "override"; priority = 50; inherit content; };
    mkDefault = content: { _type = "override"; priority = 1000; inherit content; };
    optionalAttrs = c: a: if c then a else { };
    optional = c: x: if c then [ x ] else [ ];
    optionals = c: xs: if c then xs else [ ];
    attrByPath = path: default: set:
      if path == [ ] then set
      else if isAttrs set && set ? ${builtins.head path}
      then attrByPath (builtins.tail path) default set.${builtins.head path}
      else default;
    toInt = builtins.fromJSON;
    hasPrefix = p: s: builtins.substring 0 (builtins.stringLength p) s == p;
    last = xs: elemAt xs (length xs - 1);
    splitString = sep: s: filter builtins.isString (split sep s);
    recursiveUpdate = a: b:
      a // mapAttrs (n: v: if isAttrs v && isAttrs (a.${n} or null) && !(v ? _type) then recursiveUpdate a.${n} v else v) b;
  };
  pkgs = {
    formats.toml = _: { type = null; generate = name: value: "toml:${builtins.toJSON value}"; };
    coreutils = "/coreutils";
    stdenv.hostPlatform.system = "x86_64-linux";
  };
  defaultsOf = opts:
    mapAttrs (_: o: if (o._type or "") == "option" then o.default or null else defaultsOf o) opts;
  evaluated = import module { inherit lib pkgs config; };
  name = builtins.head (builtins.attrNames evaluated.options.services);
  config = {
    networking.hostName = "test-host";
    services = {
      ${name} = lib.recursiveUpdate (defaultsOf evaluated.options.services.${name}) settings;
    } // (if hydra == null then { } else { hydra = hydra; });
  };
  resolve = v:
    if isAttrs v && (v._type or "") == "if" then (if v.condition then resolve v.content else { })
    else if isAttrs v && (v._type or "") == "merge" then foldl' (acc: c: lib.recursiveUpdate acc (resolve c)) { } v.contents
    else if isAttrs v && (v._type or "") == "override" then v // { content = resolve v.content; }
    else if isAttrs v then mapAttrs (_: resolve) v
    else v;
in
resolve evaluated.config

# Evaluates nix/module.nix WITHOUT nixpkgs, against a small stand-in for `lib` and `pkgs`
# (this file). It is not the NixOS module system: option types are not checked, coercions
# (list -> attrs) are not applied, mkIf/mkMerge are resolved by the little `resolve` below.
# What it does check: every expression of the module's `config` that the given settings
# reach evaluates, defaults are filled from the option declarations, and the generated
# units, tmpfiles rules, kernel settings, scripts and workload document are what they
# should be (nix/check/run.sh prints and inspects them).
#
#   nix-instantiate --read-write-mode --eval --strict --json nix/check/stub-eval.nix --argstr case full
{
  case ? "full",
  # values of the "full" case that run.sh points at real files
  kvExec ? "/run/current-system/sw/bin/mk-demo-kv",
  kvPort ? 7001,
  releaseKey ? "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29",
  ciKey ? "/etc/mk-upgrade/ci.pub",
  sigFile ? "/var/lib/mk-upgrade/signatures/current.sig",
}:

let
  inherit (builtins)
    isAttrs
    isList
    attrNames
    listToAttrs
    filter
    concatMap
    foldl'
    mapAttrs
    genList
    length
    elemAt
    match
    replaceStrings
    concatStringsSep
    ;

  # ---- a stand-in for nixpkgs' lib: only what module.nix uses ----------------------------
  lib = rec {
    mkOption = attrs: attrs // { _type = "option"; };
    mkEnableOption = name: {
      _type = "option";
      default = false;
      description = "Whether to enable ${name}.";
    };
    mkIf = condition: content: {
      _type = "if";
      inherit condition content;
    };
    mkMerge = contents: {
      _type = "merge";
      inherit contents;
    };
    literalExpression = text: {
      _type = "literalExpression";
      inherit text;
    };
    types =
      let
        t = name: { inherit name; };
      in
      {
        str = t "str";
        bool = t "bool";
        path = t "path";
        package = t "package";
        anything = t "anything";
        strMatching = _: t "strMatching";
        enum = _: t "enum";
        either = _: _: t "either";
        nullOr = _: t "nullOr";
        listOf = _: t "listOf";
        attrsOf = _: t "attrsOf";
        submodule = _: t "submodule";
        coercedTo = _: _: _: t "coercedTo";
      };
    nameValuePair = name: value: { inherit name value; };
    imap0 = f: l: genList (i: f i (elemAt l i)) (length l);
    mapAttrsToList = f: a: map (n: f n a.${n}) (attrNames a);
    filterAttrs =
      p: a:
      listToAttrs (
        map (n: nameValuePair n a.${n}) (filter (n: p n a.${n}) (attrNames a))
      );
    inherit listToAttrs;
    removeSuffix =
      s: str:
      let
        ls = builtins.stringLength s;
        l = builtins.stringLength str;
      in
      if l >= ls && builtins.substring (l - ls) ls str == s then builtins.substring 0 (l - ls) str else str;
    optional = c: x: if c then [ x ] else [ ];
    makeBinPath = ps: concatStringsSep ":" (map (p: "${p}/bin") ps);
    escapeShellArg =
      a:
      if match "[A-Za-z0-9_./=+-]+" a != null then a else "'${replaceStrings [ "'" ] [ "'\\''" ] a}'";
    escapeShellArgs = l: concatStringsSep " " (map escapeShellArg l);
    versionAtLeast = a: b: builtins.compareVersions a b >= 0;
    kernel.yes = {
      tristate = "y";
      optional = false;
    };
  };

  # ---- a stand-in for pkgs ----------------------------------------------------------------
  store = name: "/nix/store/00000000000000000000000000000000-${name}";
  pkgs = {
    callPackage = _: _: store "mk-upgrade-0.1.0";
    coreutils = store "coreutils";
    jq = store "jq";
    stdenv.hostPlatform.isx86_64 = true;
    # Generated files are written to the store with builtins.toFile (run with
    # --read-write-mode): the TOML document as JSON (run.sh renders it and hands it to
    # mk-upgrade's own parser), scripts as text (run.sh shellchecks them), a link farm as
    # the JSON list of its entries.
    formats.toml = _: {
      type = lib.types.anything;
      generate = name: value: builtins.toFile "${name}.json" (builtins.toJSON value);
    };
    writeText = name: text: builtins.toFile name text;
    writeShellScript = name: text: builtins.toFile name ("#!/usr/bin/env bash\n" + text);
    linkFarm = name: entries: builtins.toFile "${name}.json" (builtins.toJSON entries);
  };

  # ---- settings per case --------------------------------------------------------------------
  cases = {
    minimal = {
      enable = true;
    };
    full = {
      enable = true;
      platform = "luo";
      trustedKeys = {
        release = releaseKey;
        ci = ciKey;
      };
      # canonical (list) form; the attrs form is coerced by the real module system
      workloads = [
        {
          name = "kv-1";
          exec = kvExec;
          args = [
            "--capacity"
            "2MiB"
          ];
          memfd = [ { name = "kv-data"; } ];
          listen = [
            {
              name = "listen";
              addr = "127.0.0.1:${toString kvPort}";
            }
          ];
          health = {
            kind = "http";
            addr = "127.0.0.1:${toString kvPort}";
            timeout_ms = 5000;
          };
        }
      ];
      workloadUnits = [ "kv-store.service" ];
      liveUpgradeOnSwitch = true;
      signatureFile = sigFile;
      kernelSupport.enable = true;
    };
    # Violations the assertions must catch.
    emulatedSwitch = {
      enable = true;
      platform = "emulated";
      liveUpgradeOnSwitch = true;
    };
    oldKernel = {
      enable = true;
      kernelSupport.enable = true;
    };
  };

  kernelVersion = if case == "oldKernel" then "6.12.40" else "6.19.2";

  # ---- evaluation ---------------------------------------------------------------------------
  defaultsOf =
    opts:
    if opts ? _type && opts._type == "option" then
      opts.default or null
    else
      mapAttrs (_: defaultsOf) opts;

  recursiveUpdate =
    a: b:
    a
    // mapAttrs (
      n: v: if isAttrs v && a ? ${n} && isAttrs a.${n} && !(v ? _type) then recursiveUpdate a.${n} v else v
    ) b;

  module = import ../module.nix {
    inherit lib pkgs config;
  };

  config = {
    services.mk-upgrade = recursiveUpdate (defaultsOf module.options.services.mk-upgrade) cases.${case};
    boot.kernelPackages.kernel = {
      version = kernelVersion;
      outPath = store "linux-${kernelVersion}";
    };
  };

  # mkIf / mkMerge resolution: conditions false drop the content; merges combine attrsets
  # key by key and concatenate lists.
  merge2 =
    a: b:
    if isAttrs a && isAttrs b then
      a // mapAttrs (n: v: if a ? ${n} then merge2 a.${n} v else v) b
    else if isList a && isList b then
      a ++ b
    else
      throw "conflicting definitions: ${builtins.toJSON a} and ${builtins.toJSON b}";
  resolve =
    v:
    if isAttrs v && v ? _type && v._type == "if" then
      (if v.condition then resolve v.content else { })
    else if isAttrs v && v ? _type && v._type == "merge" then
      foldl' merge2 { } (map resolve v.contents)
    else if isAttrs v && !(v ? _type) then
      mapAttrs (_: resolve) v
    else if isList v then
      map resolve v
    else
      v;

  out = resolve module.config;
in
{
  inherit case;
  failedAssertions = map (a: a.message) (filter (a: !a.assertion) (out.assertions or [ ]));
  warnings = out.warnings or [ ];
  environment = out.environment or { };
  tmpfiles = out.systemd.tmpfiles.rules or [ ];
  services = out.systemd.services or { };
  kernelParams = out.boot.kernelParams or [ ];
  kernelPatches = out.boot.kernelPatches or [ ];
}

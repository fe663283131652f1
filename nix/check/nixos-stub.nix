# Typed stand-ins of the NixOS options nix/module.nix sets, and of the `pkgs` and `utils`
# it uses, for evaluating the module with the module system of nix/check/lib (a stand-in of
# nixpkgs' lib: real option types, checks, merges, coercions and priorities).
#
# The option types follow nixos/modules (systemd units: unit-name lists, `serviceConfig`
# values merged like nixpkgs' unitOption; activation scripts: string or
# { text, deps, supportsDryActivation }; environment.etc entries; boot.*; system.checks;
# system.requiredKernelConfig). They are declarations only: nothing here builds or runs.
#
# `pkgs` is fake: a derivation is represented by what the module gives it (a text, a build
# script) written to the store with builtins.toFile, so nix/check/run.sh can run the
# generated scripts and build commands for real. `formats.toml.generate` renders TOML here
# (nixpkgs uses remarshal; the shapes a workload document has are covered).
{ lib, withPackage ? true }:

let
  inherit (lib) mkOption types;

  # nixos/lib/systemd-lib.nix: unitNameType.
  unitNameType = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";

  # nixos/lib/systemd-unit-options.nix: a unit setting is a scalar or a list; lists of
  # several definitions are concatenated, scalars must agree.
  unitScalar = types.oneOf [
    types.bool
    types.int
    types.str
    types.path
  ];
  unitOption = types.either unitScalar (types.listOf unitScalar);
  unitSettings = types.attrsOf unitOption;

  unitCommon = {
    options = {
      description = mkOption {
        type = types.singleLineStr;
        default = "";
      };
      wantedBy = mkOption {
        type = types.listOf unitNameType;
        default = [ ];
      };
      requiredBy = mkOption {
        type = types.listOf unitNameType;
        default = [ ];
      };
      after = mkOption {
        type = types.listOf unitNameType;
        default = [ ];
      };
      before = mkOption {
        type = types.listOf unitNameType;
        default = [ ];
      };
      requires = mkOption {
        type = types.listOf unitNameType;
        default = [ ];
      };
      wants = mkOption {
        type = types.listOf unitNameType;
        default = [ ];
      };
      restartTriggers = mkOption {
        type = types.listOf types.unspecified;
        default = [ ];
      };
      enable = mkOption {
        type = types.bool;
        default = true;
      };
    };
  };

  serviceModule = {
    imports = [ unitCommon ];
    options = {
      serviceConfig = mkOption {
        type = unitSettings;
        default = { };
      };
      unitConfig = mkOption {
        type = unitSettings;
        default = { };
      };
      environment = mkOption {
        type = types.attrsOf (
          types.nullOr (
            types.oneOf [
              types.str
              types.path
              types.package
            ]
          )
        );
        default = { };
      };
      restartIfChanged = mkOption {
        type = types.bool;
        default = true;
      };
      stopIfChanged = mkOption {
        type = types.bool;
        default = true;
      };
      script = mkOption {
        type = types.lines;
        default = "";
      };
    };
  };

  pathModule = {
    imports = [ unitCommon ];
    options.pathConfig = mkOption {
      type = unitSettings;
      default = { };
    };
  };

  activationScript = types.submodule {
    options = {
      text = mkOption { type = types.lines; };
      deps = mkOption {
        type = types.listOf types.str;
        default = [ ];
      };
      supportsDryActivation = mkOption {
        type = types.bool;
        default = false;
      };
    };
  };

  etcModule =
    { name, ... }:
    {
      options = {
        target = mkOption {
          type = types.str;
          default = name;
        };
        source = mkOption { type = types.path; };
        mode = mkOption {
          type = types.str;
          default = "symlink";
        };
      };
    };

  # ---- fake pkgs ---------------------------------------------------------------------
  storeName = name: builtins.replaceStrings [ "/" ] [ "-" ] name;
  # A package that is not built here: a store path string with no context.
  fakePackage = pname: {
    type = "derivation";
    name = pname;
    inherit pname;
    outPath = "${builtins.storeDir}/00000000000000000000000000000000-${pname}";
  };
  fileDrv = name: text: extra: {
    type = "derivation";
    inherit name text;
    outPath = builtins.toFile (storeName name) text;
  } // extra;

  # TOML for the values a workload document holds: tables, arrays of tables, strings,
  # integers, floats, booleans and arrays of scalars.
  toTOML =
    let
      isTable = v: builtins.isAttrs v;
      isTableArray = v: builtins.isList v && v != [ ] && lib.all builtins.isAttrs v;
      key = k: if builtins.match "[A-Za-z0-9_-]+" k != null then k else builtins.toJSON k;
      scalar =
        v:
        if builtins.isBool v then
          (if v then "true" else "false")
        else if builtins.isInt v || builtins.isFloat v then
          toString v
        else if builtins.isString v || builtins.isPath v then
          builtins.toJSON "${v}"
        else if builtins.isList v then
          "[" + lib.concatMapStringsSep ", " scalar v + "]"
        else if builtins.isAttrs v then
          "{ " + lib.concatStringsSep ", " (lib.mapAttrsToList (k: x: "${key k} = ${scalar x}") v) + " }"
        else
          throw "toTOML: unsupported value";
      table =
        path: t:
        let
          names = builtins.attrNames t;
          plain = lib.filter (k: !(isTable t.${k}) && !(isTableArray t.${k})) names;
          subs = lib.filter (k: isTable t.${k} || isTableArray t.${k}) names;
          header = p: lib.concatStringsSep "." (map key p);
        in
        lib.concatMapStrings (k: "${key k} = ${scalar t.${k}}\n") plain
        + lib.concatMapStrings (
          k:
          let
            p = path ++ [ k ];
          in
          if isTable t.${k} then
            "\n[${header p}]\n" + table p t.${k}
          else
            lib.concatMapStrings (item: "\n[[${header p}]]\n" + table p item) t.${k}
        ) subs;
    in
    v: table [ ] (lib.filterAttrs (_: x: x != null) v);

  tomlValue = types.nullOr (
    types.oneOf [
      types.bool
      types.int
      types.float
      types.str
      types.path
      (types.attrsOf tomlValue)
      (types.listOf tomlValue)
    ]
  )
  // {
    description = "TOML value";
  };

  pkgs = {
    stdenv.hostPlatform.isx86_64 = true;
    formats.toml = _: {
      type = types.attrsOf tomlValue;
      generate = name: value: fileDrv name (toTOML value) { inherit value; };
    };
    writeText = name: text: fileDrv name text { };
    writeShellScript = name: text: fileDrv name "#!/bin/sh\n${text}" { executable = true; };
    # The derivation is its build script; run.sh runs it with $out set.
    runCommand =
      name: env: script:
      fileDrv name script {
        builder = script;
        inherit env;
      };
    # What the module before the current design used (kept so that nix/check/run.sh can
    # evaluate it with MK_NIX_CHECK_MODULE and show which checks it fails).
    callPackage = _: _: fakePackage "mk-upgrade";
    linkFarm = name: entries: fileDrv name (builtins.toJSON entries) { };
    bash = fakePackage "bash";
    coreutils = fakePackage "coreutils";
    jq = fakePackage "jq";
    util-linux = fakePackage "util-linux";
  }
  // lib.optionalAttrs withPackage { mk-upgrade = fakePackage "mk-upgrade"; };
in
{
  inherit pkgs unitNameType toTOML;

  module =
    { config, ... }:
    {
      options = {
        assertions = mkOption {
          type = types.listOf (
            types.submodule {
              options = {
                assertion = mkOption { type = types.bool; };
                message = mkOption { type = types.str; };
              };
            }
          );
          default = [ ];
        };
        warnings = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        lib = mkOption {
          type = types.attrsOf types.attrs;
          default = { };
        };
        environment = {
          systemPackages = mkOption {
            type = types.listOf types.package;
            default = [ ];
          };
          variables = mkOption {
            type = types.attrsOf (
              types.oneOf [
                types.str
                types.path
                types.int
                (types.listOf types.str)
              ]
            );
            default = { };
          };
          etc = mkOption {
            type = types.attrsOf (types.submodule etcModule);
            default = { };
          };
        };
        systemd = {
          services = mkOption {
            type = types.attrsOf (types.submodule serviceModule);
            default = { };
          };
          paths = mkOption {
            type = types.attrsOf (types.submodule pathModule);
            default = { };
          };
          tmpfiles.rules = mkOption {
            type = types.listOf types.str;
            default = [ ];
          };
        };
        system = {
          activationScripts = mkOption {
            type = types.attrsOf (types.either types.str activationScript);
            default = { };
          };
          checks = mkOption {
            type = types.listOf types.package;
            default = [ ];
          };
          requiredKernelConfig = mkOption {
            type = types.listOf types.attrs;
            default = [ ];
          };
          boot.loader.kernelFile = mkOption {
            type = types.str;
            default = "bzImage";
          };
        };
        boot = {
          kernelParams = mkOption {
            type = types.listOf (types.strMatching ''([^"[:space:]]|"[^"]*")+'');
            default = [ ];
          };
          kernelPatches = mkOption {
            type = types.listOf types.attrs;
            default = [ ];
          };
          kernelPackages = mkOption {
            type = types.raw;
            default.kernel = fakePackage "linux-6.19.2" // {
              version = "6.19.2";
            };
          };
          initrd.secrets = mkOption {
            type = types.attrsOf (types.nullOr types.path);
            default = { };
          };
        };
        nixpkgs.overlays = mkOption {
          type = types.listOf types.unspecified;
          default = [ ];
        };
      };

      config._module.args = {
        inherit pkgs;
        utils.systemdUtils.lib = { inherit unitNameType; };
      };

      # nixos/modules/system/boot/kernel.nix: config.lib.kernelConfig.
      config.lib.kernelConfig = {
        isYes = option: {
          assertion = cfg: cfg.isYes option;
          message = "CONFIG_${option} is not yes!";
          configLine = "CONFIG_${option}=y";
        };
      };
    };
}

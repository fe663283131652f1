# Evaluates nix/module.nix with the module system of nix/check/lib (a stand-in of nixpkgs'
# lib with real option types, checks, merges, coercions and priorities) and the typed
# NixOS option stand-ins of nix/check/nixos-stub.nix, for one named case; prints what
# nix/check/run.sh inspects. A case that must be refused at evaluation makes this fail,
# with the module system's message on stderr.
#
#   nix-instantiate --read-write-mode --eval --strict --json nix/check/eval.nix --argstr case full
{
  case ? "full",
  kvExec ? "/run/current-system/sw/bin/mk-demo-kv",
  kvPort ? "7001",
  releaseKey ? "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29",
  # absolute paths of real files (made path values here, as `./x` would be in a
  # configuration: copied to the store when used)
  ciKeyFile ? null,
  sigFile ? null,
  # nix/module.nix by default; run.sh points it at an older module to show which cases
  # the older one fails
  moduleFile ? ../module.nix,
}:

let
  lib = import ./lib { };
  stub = import ./nixos-stub.nix {
    inherit lib;
    withPackage = case != "noPackage";
  };

  asPath = s: if s == null then null else /. + s;
  port = toString kvPort;

  kv = {
    exec = kvExec;
    args = [
      "--capacity"
      "2MiB"
    ];
    memfd = [ { name = "kv-data"; } ];
    listen = [
      {
        name = "listen";
        addr = "127.0.0.1:${port}";
      }
    ];
    health = {
      kind = "http";
      addr = "127.0.0.1:${port}";
      timeout_ms = 5000;
    };
  };

  full = {
    enable = true;
    platform = "luo";
    # a list: coerced to { key-0 = ...; 1-ci = ...; }
    trustedKeys = [
      releaseKey
      (asPath ciKeyFile)
    ];
    # an attribute set: coerced to a list, the attribute name as the name
    workloads.kv-1 = kv;
    workloadUnits = [ "kv-store.service" ];
    liveUpgradeOnSwitch = true;
    signatureFile = asPath sigFile;
    kernelSupport.enable = true;
  };

  # Each case: the configuration modules besides the stand-ins and the module.
  cases = {
    minimal = [ { services.mk-upgrade.enable = true; } ];
    full = [ { services.mk-upgrade = full; } ];
    noPackage = [ { services.mk-upgrade.enable = true; } ];
    emulatedSwitch = [
      {
        services.mk-upgrade = {
          enable = true;
          platform = "emulated";
          liveUpgradeOnSwitch = true;
        };
      }
    ];
    oldKernel = [
      {
        services.mk-upgrade = {
          enable = true;
          kernelSupport.enable = true;
        };
        boot.kernelPackages.kernel = {
          type = "derivation";
          version = "6.12.40";
          outPath = "${builtins.storeDir}/00000000000000000000000000000000-linux-6.12.40";
        };
      }
    ];
    # item 1: a signature outside the store is not part of the generation
    hostSignature = [
      {
        services.mk-upgrade = full // {
          signatureFile = "/var/lib/mk-upgrade/signatures/current.sig";
        };
      }
    ];
    # a trusted key given as a host path
    hostKey = [
      {
        services.mk-upgrade = full // {
          trustedKeys.ci = "/etc/mk-upgrade/ci.pub";
        };
      }
    ];
    # not a key, not a path: a type error
    badKey = [
      {
        services.mk-upgrade = full // {
          trustedKeys.ci = "not-a-key";
        };
      }
    ];
    # item 6: a unit name without its suffix
    unitWithoutSuffix = [
      {
        services.mk-upgrade = full // {
          workloadUnits = [ "kv-store" ];
        };
      }
    ];
    # item 6: two workloads with the same name (list form)
    duplicateNames = [
      {
        services.mk-upgrade = full // {
          workloads = [
            (kv // { name = "kv"; })
            (
              kv
              // {
                name = "kv";
                listen = [ ];
                memfd = [ ];
              }
            )
          ];
        };
      }
    ];
    # item 6: a misspelt key evaluates (freeform) and is refused by the build-time check
    misspelt = [
      {
        services.mk-upgrade = full // {
          workloads.kv-1 = kv // {
            helth = kv.health;
          };
        };
      }
    ];
    # item 6: a workload typed option with a bad value is refused at evaluation
    relativeExec = [
      {
        services.mk-upgrade = full // {
          workloads.kv-1 = kv // {
            exec = "mk-demo-kv";
          };
        };
      }
    ];
    # item 6: unit settings are defaults, overridden without mkForce; lists merge
    override = [
      { services.mk-upgrade = full; }
      {
        systemd.services.mk-agentd.serviceConfig.ProtectHome = false;
        systemd.services.mk-agentd.serviceConfig.RemainAfterExit = false;
        systemd.services.mk-upgrade-live.serviceConfig.TimeoutStartSec = "3h";
        systemd.services.mk-agentd-serve.serviceConfig.ProtectKernelModules = false;
      }
    ];
    # item 6: one workload defined in two modules merges (a submodule, not list entries),
    # with mkDefault inside
    split = [
      { services.mk-upgrade = full; }
      {
        services.mk-upgrade.workloads.kv-1.args = lib.mkForce [ "--capacity" "4MiB" ];
        services.mk-upgrade.workloads.kv-2 = lib.mkDefault (kv // { listen = [ ]; });
      }
    ];
    # a typo in the module's own options is reported against its full name
    unknownOption = [
      {
        services.mk-upgrade = full // {
          liveUpgradeOnSwich = true;
        };
      }
    ];
  };

  eval = lib.evalModules {
    modules = [
      stub.module
      moduleFile
    ]
    ++ cases.${case};
  };
  cfg = eval.config;

  unit = u: {
    inherit (u)
      description
      wantedBy
      after
      before
      requires
      wants
      restartIfChanged
      stopIfChanged
      serviceConfig
      environment
      restartTriggers
      ;
  };
  strs = lib.mapAttrs (_: v: if builtins.isAttrs v then "${v}" else v);
in
{
  inherit case;
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) cfg.assertions);
  inherit (cfg) warnings;
  environment = {
    variables = cfg.environment.variables;
    systemPackages = map (p: "${p}") cfg.environment.systemPackages;
    etc = lib.mapAttrs (_: e: "${e.source}") cfg.environment.etc;
  };
  tmpfiles = cfg.systemd.tmpfiles.rules;
  services = lib.mapAttrs (_: s: unit s // { environment = strs s.environment; }) cfg.systemd.services;
  paths = lib.mapAttrs (_: p: {
    inherit (p) description wantedBy pathConfig;
  }) cfg.systemd.paths;
  activation = lib.mapAttrs (
    _: a:
    if builtins.isString a then
      {
        text = a;
        supportsDryActivation = false;
      }
    else
      { inherit (a) text supportsDryActivation; }
  ) cfg.system.activationScripts;
  checks = map (d: "${d}") cfg.system.checks;
  requiredKernelConfig = map (c: c.configLine) cfg.system.requiredKernelConfig;
  kernelParams = cfg.boot.kernelParams;
  kernelPatches = cfg.boot.kernelPatches;
  workloadNames = map (w: w.name) (builtins.attrValues cfg.services.mk-upgrade.workloads);
  workloadArgs = lib.mapAttrs (_: w: w.args) cfg.services.mk-upgrade.workloads;
  trustedKeyNames = builtins.attrNames cfg.services.mk-upgrade.trustedKeys;
}

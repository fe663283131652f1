# Self-tests of the nixpkgs-lib stand-in (nix/check/lib/default.nix); run them with
#
#   bash nix/check/lib/run-tests.sh
#
# `values.NAME = { expr; expected; }`: expr must evaluate (strictly) to expected.
# `failures.NAME = { expr; errors = [ SUBSTRING ... ]; }`: evaluating expr must fail and the
#   error message must contain every SUBSTRING (run-tests.sh evaluates each one in its own
#   nix-instantiate process and matches against stderr, with Nix's "error: " prefix and
#   continuation-line indentation removed). `store = true` marks cases that write a module
#   file with builtins.toFile (run with --read-write-mode).
#
# `lib` can be swapped for another implementation, e.g. nixpkgs' own lib, to check that
# the expectations are nixpkgs' behaviour: run-tests.sh --lib-expr 'import <nixpkgs/lib>'.
{
  lib ? import ./. { },
}:

let
  inherit (lib)
    mkOption
    types
    mkIf
    mkMerge
    mkDefault
    mkForce
    mkOverride
    mkOptionDefault
    mkOrder
    mkBefore
    mkAfter
    ;

  # Option `test.opt` declared in decl.nix with the given mkOption attributes, then defined
  # once per element of `defs`, in def-1.nix, def-2.nix, ...
  withOpt =
    optAttrs: defs:
    lib.evalModules {
      modules = [
        {
          _file = "decl.nix";
          options.test.opt = mkOption optAttrs;
        }
      ]
      ++ lib.imap1 (n: v: {
        _file = "def-${toString n}.nix";
        config.test.opt = v;
      }) defs;
    };
  opt = type: defs: (withOpt { inherit type; } defs).config.test.opt;

  notOfType =
    desc: file: shown:
    "A definition for option `test.opt' is not of type `${desc}'. Definition values:\n- In `${file}': ${shown}";
  # A single definition `def` of the wrong type: the message names test.opt, the type's
  # description and the value as nixpkgs prints it.
  typeFail = type: def: desc: shown: {
    expr = opt type [ def ];
    errors = [ (notOfType desc "def-1.nix" shown) ];
  };
  priorityHint = "Use `lib.mkForce value` or `lib.mkDefault value` to change the priority on any of these definitions.";

  storePath = name: "${builtins.storeDir}/00000000000000000000000000000000-${name}";
  drv = name: {
    type = "derivation";
    inherit name;
    outPath = storePath name;
  };
  pkgs = {
    hello = drv "hello-2.12";
    python3Packages.requests = drv "python3.12-requests-2.32";
  };

  # a module file written to the store, so that its path is the definition's file
  fileModule = builtins.toFile "file-module.nix" ''
    { lib, ... }: { test.opt = 42; }
  '';

  sub = types.submodule {
    options.a = mkOption {
      type = types.str;
      default = "a-default";
    };
    options.b = mkOption {
      type = types.int;
      default = 0;
    };
  };

  values = {
    # ---- type merges (successful) ------------------------------------------------------
    strEqualDefinitions = {
      expr = opt types.str [
        "a"
        "a"
      ];
      expected = "a";
    };
    boolEqualDefinitions = {
      expr = opt types.bool [
        true
        true
      ];
      expected = true;
    };
    intsAndFloats = {
      expr = [
        (opt types.int [ (-3) ])
        (opt (types.ints.between 1 10) [ 10 ])
        (opt types.ints.positive [ 1 ])
        (opt types.ints.unsigned [ 0 ])
        (opt types.port [ 65535 ])
        (opt types.float [ 1.5 ])
        (opt types.number [ 2 ])
        (opt types.number [ 2.5 ])
      ];
      expected = [
        (-3)
        10
        1
        0
        65535
        1.5
        2
        2.5
      ];
    };
    # definitions come in reverse module order (nixpkgs reverses the module list)
    linesJoinedInReverseModuleOrder = {
      expr = opt types.lines [
        "first module"
        "second module"
      ];
      expected = "second module\nfirst module";
    };
    separatedStrings = {
      expr = [
        (opt types.commas [
          "a"
          "b"
        ])
        (opt types.envVar [
          "/a"
          "/b"
        ])
        (opt (types.separatedString "; ") [
          "x"
          "y"
        ])
      ];
      expected = [
        "b,a"
        "/b:/a"
        "y; x"
      ];
    };
    singleLineStrDropsFinalNewline = {
      expr = opt types.singleLineStr [ "one line\n" ];
      expected = "one line";
    };
    nonEmptyStr = {
      expr = opt types.nonEmptyStr [ " x " ];
      expected = " x ";
    };
    pathStringAndPathValue = {
      expr = [
        (opt types.path [ "/etc/hosts" ])
        (builtins.isPath (opt types.path [ /etc/hosts ]))
        (opt types.pathInStore [ "${storePath "x"}/bin/x" ])
      ];
      expected = [
        "/etc/hosts"
        true
        "${storePath "x"}/bin/x"
      ];
    };
    packageDerivationAndStorePath = {
      expr =
        let
          fromString = opt types.package [ (storePath "foo-1.0") ];
        in
        [
          (opt types.package [ pkgs.hello ]).name
          (lib.isDerivation fromString)
          fromString.name
          "${fromString}"
        ];
      expected = [
        "hello-2.12"
        true
        "foo-1.0"
        (storePath "foo-1.0")
      ];
    };
    strMatchingEnumEither = {
      expr = [
        (opt (types.strMatching "[a-z]+") [ "abc" ])
        (opt (types.enum [
          "a"
          "b"
        ]) [ "b" ])
        (opt (types.either types.int types.str) [ 1 ])
        (opt (types.either types.int types.str) [ "s" ])
        (opt (types.oneOf [
          types.int
          types.bool
          types.str
        ]) [ true ])
      ];
      expected = [
        "abc"
        "b"
        1
        "s"
        true
      ];
    };
    nullOrAndEmptyValues = {
      expr = [
        (opt (types.nullOr types.str) [ null ])
        (opt (types.nullOr types.str) [ ])
        (opt (types.listOf types.str) [ ])
        (opt (types.attrsOf types.str) [ ])
        (opt sub [ ])
      ];
      expected = [
        null
        null
        [ ]
        { }
        # a submodule option without definitions nor default is its empty value { },
        # its options' defaults are not filled in
        { }
      ];
    };
    anythingMergesAttrsRecursively = {
      expr = opt types.anything [
        {
          a = 1;
          b.c = [ 1 ];
        }
        {
          b.d = "x";
          a = 1;
        }
      ];
      expected = {
        a = 1;
        b = {
          c = [ 1 ];
          d = "x";
        };
      };
    };
    # nixpkgs' anything: lists are not concatenated, equal ones are accepted
    anythingEqualLists = {
      expr = opt types.anything [
        [ 1 ]
        [ 1 ]
      ];
      expected = [ 1 ];
    };
    unspecifiedConcatenatesLists = {
      expr = opt types.unspecified [
        [ 1 ]
        [ 2 ]
      ];
      expected = [
        2
        1
      ];
    };
    attrsShallowMerge = {
      expr = opt types.attrs [
        {
          a = 1;
          n.x = 1;
        }
        {
          b = 2;
          n.y = 2;
        }
      ];
      expected = {
        a = 1;
        b = 2;
        n.x = 1;
      };
    };
    rawKeepsValue = {
      expr = opt types.raw [ { _type = "whatever"; } ];
      expected = {
        _type = "whatever";
      };
    };
    functionToMergesResults = {
      expr = (opt (types.functionTo (types.listOf types.int)) [ (x: [ x ]) (x: [ (x + 1) ]) ]) 1;
      expected = [
        2
        1
      ];
    };
    boolByOr = {
      expr = opt types.boolByOr [
        false
        true
      ];
      expected = true;
    };
    uniqSingleDefinition = {
      expr = opt (types.uniq (types.listOf types.str)) [ [ "x" ] ];
      expected = [ "x" ];
    };
    nonEmptyListOf = {
      expr = opt (types.nonEmptyListOf types.int) [ [ 1 ] ];
      expected = [ 1 ];
    };
    optionTypeMergesTypes = {
      expr = [
        (opt types.optionType [ types.str ]).description
        (opt types.optionType [
          (types.attrsOf types.int)
          (types.attrsOf types.int)
        ]).description
      ];
      expected = [
        "string"
        "attribute set of signed integer"
      ];
    };
    deferredModuleCollectsDefinitions = {
      expr =
        let
          m = opt types.deferredModule [
            { test2 = 1; }
            { test2 = 2; }
          ];
        in
        [
          (builtins.length m.imports)
          (builtins.head m.imports)._file
        ];
      expected = [
        2
        "def-2.nix, via option test.opt"
      ];
    };
    coercedToListToAttrs = {
      expr = opt (types.coercedTo (types.listOf types.str) (l: lib.genAttrs l (n: n + "!")) (
        types.attrsOf types.str
      )) [ [ "a" "b" ] { c = "c"; } ];
      expected = {
        a = "a!";
        b = "b!";
        c = "c";
      };
    };
    coercedToScalar = {
      expr = opt (types.coercedTo types.int toString types.str) [ 42 ];
      expected = "42";
    };
    lazyAttrsOfIsLazy = {
      expr =
        let
          v = opt (types.lazyAttrsOf types.int) [
            {
              a = 1;
              b = throw "not evaluated";
              c = mkIf false 3;
            }
          ];
        in
        [
          v.a
          (v ? c)
          (opt (types.attrsOf types.int) [ { c = mkIf false 3; } ] ? c)
        ];
      expected = [
        1
        true
        false
      ];
    };
    descriptions = {
      expr = map (t: t.description) [
        (types.listOf types.str)
        (types.attrsOf (types.submodule { }))
        (types.listOf (types.submodule { }))
        (types.nullOr types.str)
        (types.nullOr (types.either types.str types.int))
        (types.either (types.listOf types.str) types.str)
        (types.either types.str (types.listOf types.str))
        (types.attrsOf (types.listOf types.str))
        (types.listOf (types.nullOr types.str))
        (types.enum [
          "a"
          "b"
        ])
        (types.enum [ "a" ])
        (types.strMatching "[a-z]+")
        (types.coercedTo (types.listOf types.str) lib.id (types.attrsOf types.str))
        (types.functionTo types.str)
        (types.lazyAttrsOf types.int)
        types.lines
        (types.submodule { freeformType = types.attrsOf types.str; })
        (types.either types.ints.unsigned types.str)
        types.port
        types.path
        types.pathInStore
        types.package
        (types.uniq (types.listOf types.str))
        types.number
        (types.nonEmptyListOf types.str)
        (types.oneOf [
          types.int
          types.str
          types.bool
        ])
        types.anything
        types.raw
        types.unspecified
        types.attrs
        types.bool
        types.singleLineStr
        types.nonEmptyStr
      ];
      expected = [
        "list of string"
        "attribute set of (submodule)"
        "list of (submodule)"
        "null or string"
        "null or string or signed integer"
        "(list of string) or string"
        "string or list of string"
        "attribute set of list of string"
        "list of (null or string)"
        "one of \"a\", \"b\""
        "value \"a\" (singular enum)"
        "string matching the pattern [a-z]+"
        "(attribute set of string) or (list of string) convertible to it"
        "function that evaluates to a(n) string"
        "lazy attribute set of signed integer"
        "strings concatenated with \"\\n\""
        "attribute set of string"
        "unsigned integer, meaning >=0, or string"
        "16 bit unsigned integer; between 0 and 65535 (both inclusive)"
        "absolute path"
        "path in the Nix store"
        "package"
        "list of string"
        "signed integer or floating point number"
        "non-empty (list of string)"
        "signed integer or string or boolean"
        "anything"
        "raw value"
        "unspecified value"
        "attribute set"
        "boolean"
        "(optionally newline-terminated) single-line string"
        "non-empty string"
      ];
    };

    # ---- priorities and properties -----------------------------------------------------
    optionDefaultUsed = {
      expr =
        (withOpt {
          type = types.str;
          default = "d";
        } [ ]).config.test.opt;
      expected = "d";
    };
    mkDefaultBeatsOptionDefault = {
      expr =
        (withOpt {
          type = types.str;
          default = "d";
        } [ (mkDefault "m") ]).config.test.opt;
      expected = "m";
    };
    plainBeatsMkDefault = {
      expr = opt types.str [
        (mkDefault "default")
        "plain"
      ];
      expected = "plain";
    };
    mkForceBeatsPlain = {
      expr = opt types.str [
        "plain"
        (mkForce "forced")
        "plain too"
      ];
      expected = "forced";
    };
    mkOverrideLowestNumberWins = {
      expr = opt types.str [
        (mkForce "forced")
        (mkOverride 10 "vm")
        (mkOverride 60 "image")
      ];
      expected = "vm";
    };
    samePriorityMergedByType = {
      expr =
        (withOpt {
          type = types.listOf types.int;
          default = [ 1 ];
        } [ (mkOptionDefault [ 2 ]) ]).config.test.opt;
      expected = [
        1
        2
      ];
    };
    mkIfFalseDrops = {
      expr = [
        (opt (types.listOf types.str) [
          (mkIf false [ "dropped" ])
          [ "kept" ]
          (mkIf true [ "also kept" ])
        ])
        (withOpt {
          type = types.str;
          default = "d";
        } [ (mkIf false "dropped") ]).config.test.opt
      ];
      expected = [
        [
          "also kept"
          "kept"
        ]
        "d"
      ];
    };
    mkIfFalseOnAModuleConfig = {
      expr =
        (lib.evalModules {
          modules = [
            {
              options.test.opt = mkOption {
                type = types.str;
                default = "d";
              };
            }
            { config = mkIf false { test.opt = "dropped"; }; }
          ];
        }).config.test.opt;
      expected = "d";
    };
    mkMergeFlattens = {
      expr = opt (types.listOf types.int) [
        (mkMerge [
          [ 1 ]
          (mkIf true [ 2 ])
          (mkMerge [ [ 3 ] ])
        ])
      ];
      expected = [
        1
        2
        3
      ];
    };
    mkMergeOfModuleConfigs = {
      expr =
        (lib.evalModules {
          modules = [
            {
              options.x = mkOption { type = types.int; };
              options.y = mkOption {
                type = types.int;
                default = 0;
              };
            }
            {
              config = mkMerge [
                { x = 1; }
                (mkIf true { y = 2; })
                (mkIf false { y = 3; })
              ];
            }
          ];
        }).config;
      expected = {
        x = 1;
        y = 2;
      };
    };
    mkBeforeMkAfterList = {
      expr = opt (types.listOf types.str) [
        [ "middle" ]
        (mkAfter [ "last" ])
        (mkBefore [ "first" ])
        (mkOrder 1200 [ "late" ])
      ];
      expected = [
        "first"
        "middle"
        "late"
        "last"
      ];
    };
    mkBeforeMkAfterLines = {
      expr = opt types.lines [
        (mkAfter "c")
        "b"
        (mkBefore "a")
      ];
      expected = "a\nb\nc";
    };
    listsInReverseModuleOrder = {
      expr = opt (types.listOf types.int) [
        [ 1 ]
        [ 2 ]
        [ 3 ]
      ];
      expected = [
        3
        2
        1
      ];
    };
    optionAttributes = {
      expr =
        let
          o =
            (withOpt {
              type = types.int;
              default = 1;
            } [ (mkDefault 2) ]).options.test.opt;
        in
        {
          inherit (o)
            value
            highestPrio
            isDefined
            files
            declarations
            loc
            ;
          shown = "${o}";
        };
      expected = {
        value = 2;
        highestPrio = 1000;
        isDefined = true;
        files = [ "def-1.nix" ];
        declarations = [ "decl.nix" ];
        loc = [
          "test"
          "opt"
        ];
        shown = "test.opt";
      };
    };

    # ---- submodules --------------------------------------------------------------------
    attrsOfSubmoduleMergesDefinitions = {
      expr = opt (types.attrsOf sub) [
        { foo.a = "from one"; }
        {
          foo.b = 2;
          bar = { };
        }
      ];
      expected = {
        foo = {
          a = "from one";
          b = 2;
        };
        bar = {
          a = "a-default";
          b = 0;
        };
      };
    };
    submoduleNameArgument = {
      expr =
        opt
          (types.attrsOf (
            types.submodule (
              { name, config, ... }:
              {
                options.n = mkOption {
                  type = types.str;
                  default = name;
                };
                options.greeting = mkOption {
                  type = types.str;
                  default = "hello ${config.n}";
                };
              }
            )
          ))
          [
            {
              alice = { };
              bob.n = "Robert";
            }
          ];
      expected = {
        alice = {
          n = "alice";
          greeting = "hello alice";
        };
        bob = {
          n = "Robert";
          greeting = "hello Robert";
        };
      };
    };
    listOfSubmoduleName = {
      expr = map (x: x.n) (
        opt (types.listOf (
          types.submodule (
            { name, ... }:
            {
              options.n = mkOption { default = name; };
            }
          )
        )) [ [ { } ] ]
      );
      expected = [ "[definition 1-entry 1]" ];
    };
    freeformAcceptsUnknownKeys = {
      expr =
        opt
          (types.submodule {
            freeformType = types.attrsOf types.anything;
            options.port = mkOption {
              type = types.port;
              default = 80;
            };
          })
          [
            {
              extra = "x";
              nested.deep = [ 1 ];
            }
            { port = 8080; }
          ];
      expected = {
        extra = "x";
        nested.deep = [ 1 ];
        port = 8080;
      };
    };
    submoduleArgsAndFunctionDefinitions = {
      expr =
        opt
          (types.submoduleWith {
            specialArgs.greeting = "hi";
            modules = [
              (
                { greeting, ... }:
                {
                  options.msg = mkOption {
                    type = types.str;
                    default = greeting;
                  };
                  options.other = mkOption {
                    type = types.str;
                    default = "";
                  };
                }
              )
            ];
          })
          [
            (
              { config, ... }:
              {
                other = config.msg + "!";
              }
            )
          ];
      expected = {
        msg = "hi";
        other = "hi!";
      };
    };

    # ---- declarations ------------------------------------------------------------------
    optionTreeFromTwoModules = {
      expr =
        (lib.evalModules {
          modules = [
            { options.services.x.enable = lib.mkEnableOption "x"; }
            {
              options.services.x.port = mkOption {
                type = types.port;
                default = 1;
              };
            }
            { services.x.enable = true; }
          ];
        }).config.services.x;
      expected = {
        enable = true;
        port = 1;
      };
    };
    sameSubmoduleOptionDeclaredTwice = {
      expr =
        (lib.evalModules {
          modules = [
            {
              _file = "a.nix";
              options.s = mkOption {
                type = types.attrsOf (
                  types.submodule { options.a = mkOption { type = types.str; }; }
                );
                default = { };
              };
            }
            {
              _file = "b.nix";
              options.s = mkOption {
                type = types.attrsOf (
                  types.submodule {
                    options.b = mkOption {
                      type = types.int;
                      default = 7;
                    };
                  }
                );
              };
            }
            { s.foo.a = "x"; }
          ];
        }).config.s;
      expected = {
        foo = {
          a = "x";
          b = 7;
        };
      };
    };
    optionTreeMergedIntoSubmoduleOption = {
      expr =
        (lib.evalModules {
          modules = [
            {
              options.sub = mkOption {
                type = types.submodule { options.a = mkOption { default = 1; }; };
                default = { };
              };
            }
            { options.sub.b = mkOption { default = 2; }; }
          ];
        }).config.sub;
      expected = {
        a = 1;
        b = 2;
      };
    };
    enumDeclarationsMerge = {
      expr =
        (lib.evalModules {
          modules = [
            { options.e = mkOption { type = types.enum [ "a" ]; }; }
            { options.e = mkOption { type = types.enum [ "b" ]; }; }
            { e = "b"; }
          ];
        }).options.e.type.description;
      # declarations are merged in reverse module order, like definitions
      expected = "one of \"b\", \"a\"";
    };
    readOnlySingleDefinition = {
      expr =
        (withOpt {
          type = types.int;
          readOnly = true;
        } [ 3 ]).config.test.opt;
      expected = 3;
    };
    applyFunction = {
      expr = [
        (withOpt {
          type = types.int;
          apply = x: x * 2;
        } [ 3 ]).config.test.opt
        (withOpt {
          type = types.int;
          default = 5;
          apply = x: x * 2;
        } [ ]).config.test.opt
      ];
      expected = [
        6
        10
      ];
    };

    # ---- mkPackageOption ---------------------------------------------------------------
    mkPackageOptionPresent = {
      expr =
        let
          o = lib.mkPackageOption pkgs "hello" { };
          nested = lib.mkPackageOption pkgs "requests" {
            default = [
              "python3Packages"
              "requests"
            ];
            extraDescription = "Used for HTTP.";
          };
          ev = lib.evalModules {
            modules = [
              {
                options.p = o;
                options.q = nested;
              }
            ];
          };
        in
        {
          value = ev.config.p.name;
          nested = ev.config.q.name;
          inherit (o) description;
          nestedDescription = nested.description;
          defaultText = o.defaultText.text;
          nestedDefaultText = nested.defaultText.text;
          type = o.type.description;
        };
      expected = {
        value = "hello-2.12";
        nested = "python3.12-requests-2.32";
        description = "The hello package to use.";
        nestedDescription = "The requests package to use. Used for HTTP.";
        defaultText = "pkgs.hello";
        nestedDefaultText = "pkgs.python3Packages.requests";
        type = "package";
      };
    };
    mkPackageOptionMissingButDefined = {
      expr =
        (lib.evalModules {
          modules = [
            { options.p = lib.mkPackageOption pkgs "missing" { }; }
            { p = pkgs.hello; }
          ];
        }).config.p.name;
      expected = "hello-2.12";
    };
    mkPackageOptionNullable = {
      expr =
        let
          o = lib.mkPackageOption pkgs "none" {
            nullable = true;
            default = null;
          };
        in
        [
          (lib.evalModules { modules = [ { options.p = o; } ]; }).config.p
          o.type.description
        ];
      expected = [
        null
        "null or package"
      ];
    };

    # ---- module system -----------------------------------------------------------------
    configSelfReferenceAcrossModules = {
      expr =
        (lib.evalModules {
          modules = [
            (
              { config, ... }:
              {
                options.a = mkOption { type = types.str; };
                config.b = config.a + "-derived";
                config.c = mkIf (config.b == "x-derived") [ "conditional" ];
              }
            )
            {
              options.b = mkOption { type = types.str; };
              options.c = mkOption {
                type = types.listOf types.str;
                default = [ ];
              };
            }
            { a = "x"; }
          ];
        }).config;
      expected = {
        a = "x";
        b = "x-derived";
        c = [ "conditional" ];
      };
    };
    moduleArgsFromConfig = {
      expr =
        (lib.evalModules {
          specialArgs.fromSpecial = "s";
          modules = [
            { _module.args.pkgs = pkgs; }
            (
              {
                pkgs,
                fromSpecial,
                lib,
                ...
              }:
              {
                options.x = mkOption { type = types.str; };
                config.x = "${pkgs.hello.name} ${fromSpecial} ${lib.boolToString true}";
              }
            )
          ];
        }).config.x;
      expected = "hello-2.12 s true";
    };
    importsAndKeys = {
      expr =
        let
          shared = {
            key = "shared";
            l = [ "shared" ];
          };
        in
        (lib.evalModules {
          modules = [
            {
              options.l = mkOption {
                type = types.listOf types.str;
                default = [ ];
              };
            }
            {
              imports = [
                shared
                { l = [ "imported" ]; }
              ];
            }
            { imports = [ shared ]; }
          ];
        }).config.l;
      expected = [
        "imported"
        "shared"
      ];
    };
    disabledModules = {
      expr =
        (lib.evalModules {
          modules = [
            {
              options.l = mkOption {
                type = types.listOf types.str;
                default = [ ];
              };
            }
            {
              key = "unwanted";
              l = [ "unwanted" ];
            }
            { l = [ "wanted" ]; }
            { disabledModules = [ { key = "unwanted"; } ]; }
          ];
        }).config.l;
      expected = [ "wanted" ];
    };
    rootFreeformType = {
      expr =
        (lib.evalModules {
          modules = [
            {
              freeformType = types.attrsOf types.int;
              options.declared = mkOption {
                type = types.str;
                default = "d";
              };
            }
            {
              free = 1;
              more = 2;
            }
          ];
        }).config;
      expected = {
        declared = "d";
        free = 1;
        more = 2;
      };
    };
    optionsArgument = {
      expr =
        (lib.evalModules {
          modules = [
            (
              { options, ... }:
              {
                options.a = mkOption {
                  type = types.int;
                  default = 1;
                };
                options.aDefined = mkOption { type = types.bool; };
                config.aDefined = options.a.isDefined && options.a.highestPrio == 1500;
              }
            )
          ];
        }).config.aDefined;
      expected = true;
    };
    extendModules = {
      expr =
        let
          base = withOpt {
            type = types.listOf types.int;
            default = [ ];
          } [ [ 1 ] ];
        in
        (base.extendModules { modules = [ { test.opt = [ 2 ]; } ]; }).config.test.opt;
      expected = [
        2
        1
      ];
    };
    shorthandAndExplicitModules = {
      expr =
        (lib.evalModules {
          modules = [
            {
              options.x = mkOption { type = types.int; };
              options.y = mkOption { type = types.int; };
            }
            { x = 1; }
            { config.y = 2; }
          ];
        }).config;
      expected = {
        x = 1;
        y = 2;
      };
    };
    moduleFromFile = {
      store = true;
      expr =
        (lib.evalModules {
          modules = [
            {
              options.test.opt = mkOption { type = types.int; };
            }
            fileModule
          ];
        }).options.test.opt.files;
      expected = [ (toString fileModule) ];
    };

    # ---- general lib functions ---------------------------------------------------------
    listFunctions = {
      expr = with lib; {
        optional = optional true 1 ++ optional false 2;
        optionals = optionals true [ 1 2 ];
        imap0 = imap0 (i: x: i + x) [ 10 20 ];
        imap1 = imap1 (i: x: i + x) [ 10 20 ];
        flatten = flatten [ 1 [ 2 [ 3 ] ] ];
        toList = toList 1 ++ toList [ 2 ];
        unique = unique [ 1 2 1 3 2 ];
        lastInit = [ (last [ 1 2 3 ]) (init [ 1 2 3 ]) ];
        headTail = [ (head [ 1 2 ]) (tail [ 1 2 ]) ];
        anyAll = [ (any (x: x > 2) [ 1 3 ]) (all (x: x > 2) [ 1 3 ]) ];
        filterElemLength = [ (filter (x: x > 1) [ 1 2 3 ]) (elem 2 [ 1 2 ]) (length [ 1 2 ]) ];
        concatMap = concatMap (x: [ x x ]) [ 1 2 ];
        genList = genList (x: x * x) 4;
        folds = [ (foldl' (a: b: a - b) 10 [ 1 2 ]) (foldr (a: b: a - b) 10 [ 1 2 ]) (fold (a: b: a + b) 0 [ 1 2 ]) (foldl (a: b: a - b) 10 [ 1 2 ]) ];
        count = count (x: x > 1) [ 1 2 3 ];
        findFirst = [ (findFirst (x: x > 1) null [ 1 2 3 ]) (findFirst (x: x > 5) "none" [ 1 ]) ];
        groupBy = groupBy (x: if x > 1 then "big" else "small") [ 1 2 3 ];
        sort = sort (a: b: a < b) [ 3 1 2 ];
        naturalSort = naturalSort [ "a10" "a2" "a1" ];
        range = range 2 5;
        subtract = subtractLists [ 2 ] [ 1 2 3 ];
        intersect = intersectLists [ 2 3 ] [ 1 2 3 ];
        mutuallyExclusive = [ (mutuallyExclusive [ 1 ] [ 2 ]) (mutuallyExclusive [ 1 ] [ 1 ]) ];
        takeDrop = [ (take 2 [ 1 2 3 ]) (drop 2 [ 1 2 3 ]) ];
        reverseList = reverseList [ 1 2 3 ];
      };
      expected = {
        optional = [ 1 ];
        optionals = [ 1 2 ];
        imap0 = [ 10 21 ];
        imap1 = [ 11 22 ];
        flatten = [ 1 2 3 ];
        toList = [ 1 2 ];
        unique = [ 1 2 3 ];
        lastInit = [ 3 [ 1 2 ] ];
        headTail = [ 1 [ 2 ] ];
        anyAll = [ true false ];
        filterElemLength = [ [ 2 3 ] true 2 ];
        concatMap = [ 1 1 2 2 ];
        genList = [ 0 1 4 9 ];
        folds = [ 7 9 3 7 ];
        count = 2;
        findFirst = [ 2 "none" ];
        groupBy = {
          big = [ 2 3 ];
          small = [ 1 ];
        };
        sort = [ 1 2 3 ];
        naturalSort = [ "a1" "a2" "a10" ];
        range = [ 2 3 4 5 ];
        subtract = [ 1 3 ];
        intersect = [ 2 3 ];
        mutuallyExclusive = [ true false ];
        takeDrop = [ [ 1 2 ] [ 3 ] ];
        reverseList = [ 3 2 1 ];
      };
    };
    stringFunctions = {
      expr = with lib; {
        optionalString = optionalString true "a" + optionalString false "b";
        concatStringsSep = concatStringsSep "," [ "a" "b" ];
        concatMapStringsSep = concatMapStringsSep "-" toUpper [ "a" "b" ];
        concatMapStrings = concatMapStrings (x: x + x) [ "a" "b" ];
        concatLines = concatLines [ "a" "b" ];
        removeSuffix = [ (removeSuffix ".pub" "key.pub") (removeSuffix ".pub" "key") ];
        removePrefix = [ (removePrefix "/nix" "/nix/store") (removePrefix "x" "abc") ];
        prefixSuffixInfix = [ (hasPrefix "ab" "abc") (hasSuffix "bc" "abc") (hasInfix "b" "abc") (hasInfix "x.y" "axyz") ];
        splitString = splitString "." "a.b..c";
        replaceStrings = replaceStrings [ "a" ] [ "b" ] "aca";
        case = [ (toUpper "abC") (toLower "ABc") ];
        versions = [ (versionAtLeast "6.19.2" "6.19") (versionAtLeast "6.12.40" "6.19") (versionOlder "1.2" "1.10") (versions.majorMinor "6.19.2") ];
        toInt = [ (toInt "42") (toInt " -7 ") ];
        escape = escape [ "$" ] "a$b";
        boolToString = boolToString false;
        escapeShellArg = [ (escapeShellArg "plain/path-1.0") (escapeShellArg "it's") (escapeShellArg "a b") ];
        escapeShellArgs = escapeShellArgs [ "a" "b c" ];
        makeBinPath = makeBinPath [ "/x" { outPath = "/y"; } { bin = "/z-bin"; out = "/z"; } ];
        makeSearchPath = makeSearchPath "lib" [ "/a" "/b" ];
        getExe = getExe' pkgs.hello "hello";
        getExeMainProgram = getExe (pkgs.hello // { meta.mainProgram = "hi"; });
        getBinLib = [ (getBin { out = "/o"; bin = "/b"; }) (getLib "/plain") ];
        isStringLike = [ (isStringLike "a") (isStringLike pkgs.hello) (isStringLike 1) ];
        isStorePath = [ (isStorePath (storePath "x")) (isStorePath "/etc/x") ];
        showOption = showOption [ "services" "foo.bar" "<name>" "*" "2bwm" "enable" ];
      };
      expected = {
        optionalString = "a";
        concatStringsSep = "a,b";
        concatMapStringsSep = "A-B";
        concatMapStrings = "aabb";
        concatLines = "a\nb\n";
        removeSuffix = [ "key" "key" ];
        removePrefix = [ "/store" "abc" ];
        prefixSuffixInfix = [ true true true false ];
        splitString = [ "a" "b" "" "c" ];
        replaceStrings = "bcb";
        case = [ "ABC" "abc" ];
        versions = [ true false true "6.19" ];
        toInt = [ 42 (-7) ];
        escape = "a\\$b";
        boolToString = "false";
        escapeShellArg = [ "plain/path-1.0" "'it'\\''s'" "'a b'" ];
        escapeShellArgs = "a 'b c'";
        makeBinPath = "/x/bin:/y/bin:/z-bin/bin";
        makeSearchPath = "/a/lib:/b/lib";
        getExe = "${storePath "hello-2.12"}/bin/hello";
        getExeMainProgram = "${storePath "hello-2.12"}/bin/hi";
        getBinLib = [ "/b" "/plain" ];
        isStringLike = [ true true false ];
        isStorePath = [ true false ];
        showOption = "services.\"foo.bar\".<name>.*.\"2bwm\".enable";
      };
    };
    attrsetFunctions = {
      expr = with lib; {
        mapAttrsToList = mapAttrsToList (n: v: n + v) { a = "1"; b = "2"; };
        mapAttrs = mapAttrs (n: v: v + 1) { a = 1; };
        mapAttrs' = mapAttrs' (n: v: nameValuePair "x-${n}" v) { a = 1; };
        filterAttrs = filterAttrs (n: v: v > 1) { a = 1; b = 2; };
        listToAttrs = listToAttrs [ (nameValuePair "a" 1) ];
        attrNamesValues = [ (attrNames { b = 1; a = 2; }) (attrValues { b = 1; a = 2; }) ];
        attrByPath = [ (attrByPath [ "a" "b" ] 0 { a.b = 1; }) (attrByPath [ "a" "c" ] 0 { a.b = 1; }) ];
        getAttrFromPath = getAttrFromPath [ "a" "b" ] { a.b = 1; };
        setAttrByPath = setAttrByPath [ "a" "b" ] 1;
        hasAttrByPath = [ (hasAttrByPath [ "a" "b" ] { a.b = null; }) (hasAttrByPath [ "a" "c" ] { a.b = 1; }) ];
        recursiveUpdate = recursiveUpdate { a.b = 1; a.c = 2; d = 1; } { a.b = 3; d = { x = 1; }; };
        optionalAttrs = optionalAttrs true { a = 1; } // optionalAttrs false { b = 2; };
        zipAttrsWith = zipAttrsWith (n: vs: vs) [ { a = 1; } { a = 2; b = 3; } ];
        genAttrs = genAttrs [ "a" "b" ] (n: n + n);
        isDerivation = [ (isDerivation pkgs.hello) (isDerivation { }) ];
      };
      expected = {
        mapAttrsToList = [ "a1" "b2" ];
        mapAttrs = { a = 2; };
        mapAttrs' = { x-a = 1; };
        filterAttrs = { b = 2; };
        listToAttrs = { a = 1; };
        attrNamesValues = [ [ "a" "b" ] [ 2 1 ] ];
        attrByPath = [ 1 0 ];
        getAttrFromPath = 1;
        setAttrByPath = { a.b = 1; };
        hasAttrByPath = [ true false ];
        recursiveUpdate = {
          a = {
            b = 3;
            c = 2;
          };
          d = { x = 1; };
        };
        optionalAttrs = { a = 1; };
        zipAttrsWith = {
          a = [ 1 2 ];
          b = [ 3 ];
        };
        genAttrs = {
          a = "aa";
          b = "bb";
        };
        isDerivation = [ true false ];
      };
    };
    trivialAndKernel = {
      expr = with lib; {
        idConstFlip = [ (id 1) (const 1 2) (flip (a: b: a - b) 1 3) ];
        throwIfNot = throwIfNot true "unused" "passed";
        assertMsg = assertMsg true "unused";
        yes = kernel.yes;
        option = kernel.option kernel.module;
        freeform = kernel.freeform "4096";
        no = kernel.no;
        unset = kernel.unset;
        mdDoc = mdDoc "text";
        literalExpression = literalExpression "pkgs.foo";
        literalMD = literalMD "`x`";
        toPretty = generators.toPretty { } { a = [ 1 "s" ]; b = null; };
      };
      expected = {
        idConstFlip = [ 1 1 2 ];
        throwIfNot = "passed";
        assertMsg = true;
        yes = {
          tristate = "y";
          optional = false;
        };
        option = {
          tristate = "m";
          optional = true;
        };
        freeform = {
          freeform = "4096";
          optional = false;
        };
        no = {
          tristate = "n";
          optional = false;
        };
        unset = {
          tristate = null;
          optional = false;
        };
        mdDoc = "text";
        literalExpression = {
          _type = "literalExpression";
          text = "pkgs.foo";
        };
        literalMD = {
          _type = "literalMD";
          text = "`x`";
        };
        toPretty = "{\n  a = [\n    1\n    \"s\"\n  ];\n  b = null;\n}";
      };
    };
  };

  failures = {
    # ---- every type's check: the message names the option path, the type, the file -----
    strCheck = typeFail types.str 1 "string" "1";
    nonEmptyStrCheck = typeFail types.nonEmptyStr " " "non-empty string" "\" \"";
    # a value of several lines is shown indented on the following lines
    singleLineStrCheck = {
      expr = opt types.singleLineStr [ "two\nlines" ];
      errors = [
        "A definition for option `test.opt' is not of type `(optionally newline-terminated) single-line string'. Definition values:\n- In `def-1.nix':\n    ''\n      two\n      lines''"
      ];
    };
    linesCheck = typeFail types.lines 1 "strings concatenated with \"\\n\"" "1";
    commasCheck = typeFail types.commas 1 "strings concatenated with \",\"" "1";
    envVarCheck = typeFail types.envVar true "strings concatenated with \":\"" "true";
    separatedStringCheck = typeFail (types.separatedString "; ") null "strings concatenated with \"; \"" "null";
    boolCheck = typeFail types.bool "yes" "boolean" "\"yes\"";
    boolByOrCheck = typeFail types.boolByOr 1 "boolean (merged using or)" "1";
    intCheck = typeFail types.int "1" "signed integer" "\"1\"";
    intsPositiveCheck = typeFail types.ints.positive 0 "positive integer, meaning >0" "0";
    intsUnsignedCheck = typeFail types.ints.unsigned (-1) "unsigned integer, meaning >=0" "-1";
    intsBetweenCheck = typeFail (types.ints.between 1 10) 11 "integer between 1 and 10 (both inclusive)" "11";
    portCheck = typeFail types.port 70000 "16 bit unsigned integer; between 0 and 65535 (both inclusive)" "70000";
    floatCheck = typeFail types.float 1 "floating point number" "1";
    numberCheck = typeFail types.number "1" "signed integer or floating point number" "\"1\"";
    pathCheck = typeFail types.path "relative/file" "absolute path" "\"relative/file\"";
    pathInStoreCheck = typeFail types.pathInStore "/etc/hosts" "path in the Nix store" "\"/etc/hosts\"";
    packageCheck = typeFail types.package "hello" "package" "\"hello\"";
    attrsCheck = typeFail types.attrs 1 "attribute set" "1";
    strMatchingCheck = typeFail (types.strMatching "[a-z]+") "ABC" "string matching the pattern [a-z]+" "\"ABC\"";
    enumCheck = typeFail (types.enum [
      "auto"
      "luo"
    ]) "xen" "one of \"auto\", \"luo\"" "\"xen\"";
    eitherCheck = typeFail (types.either types.int types.str) true "signed integer or string" "true";
    oneOfCheck = typeFail (types.oneOf [
      types.int
      types.str
      types.bool
    ]) 1.5 "signed integer or string or boolean" "1.5";
    nullOrCheck = typeFail (types.nullOr types.str) 1 "null or string" "1";
    listOfCheck = typeFail (types.listOf types.str) "a" "list of string" "\"a\"";
    nonEmptyListOfCheck = typeFail (types.nonEmptyListOf types.str) [ ] "non-empty (list of string)" "[ ]";
    attrsOfCheck = typeFail (types.attrsOf types.int) [ ] "attribute set of signed integer" "[ ]";
    lazyAttrsOfCheck = typeFail (types.lazyAttrsOf types.int) 1 "lazy attribute set of signed integer" "1";
    uniqCheck = typeFail (types.uniq types.str) 1 "string" "1";
    functionToCheck = typeFail (types.functionTo types.str) "x" "function that evaluates to a(n) string" "\"x\"";
    submoduleCheck = typeFail sub 1 "submodule" "1";
    coercedToCheck = typeFail (types.coercedTo types.int toString types.str) true "string or signed integer convertible to it" "true";
    optionTypeCheck = typeFail types.optionType 1 "optionType" "1";
    deferredModuleCheck = typeFail types.deferredModule 1 "module" "1";
    passwdEntryCheck = typeFail (types.passwdEntry types.str) "a:b" "string, not containing newlines or colons" "\"a:b\"";

    # ---- nested paths ------------------------------------------------------------------
    listOfElementPath = {
      expr = opt (types.listOf types.int) [
        [
          1
          "two"
        ]
      ];
      errors = [
        "A definition for option `test.opt.\"[definition 1-entry 2]\"' is not of type `signed integer'. Definition values:\n- In `def-1.nix': \"two\""
      ];
    };
    listOfElementPathSecondDefinition = {
      expr = opt (types.listOf types.int) [
        [ 1 ]
        [ "x" ]
      ];
      # the second module's list is the first definition
      errors = [ "`test.opt.\"[definition 1-entry 1]\"' is not of type `signed integer'. Definition values:\n- In `def-2.nix': \"x\"" ];
    };
    attrsOfElementPath = {
      expr = opt (types.attrsOf types.int) [
        {
          ok = 1;
          bad-name = "x";
        }
      ];
      errors = [ "A definition for option `test.opt.bad-name' is not of type `signed integer'. Definition values:\n- In `def-1.nix': \"x\"" ];
    };
    coercedToCoercedValueChecked = {
      expr = opt (types.coercedTo (types.listOf types.str) (l: lib.genAttrs l (_: 1)) (
        types.attrsOf types.str
      )) [ [ "k" ] ];
      errors = [ "A definition for option `test.opt.k' is not of type `string'. Definition values:\n- In `def-1.nix': 1" ];
    };
    freeformTypedOptionStillChecked = {
      expr = opt (types.submodule {
        freeformType = types.attrsOf types.anything;
        options.port = mkOption { type = types.port; };
      }) [ { port = "80"; extra = 1; } ];
      errors = [
        "A definition for option `test.opt.port' is not of type `16 bit unsigned integer; between 0 and 65535 (both inclusive)'. Definition values:\n- In `def-1.nix': \"80\""
      ];
    };
    freeformValuesChecked = {
      expr = opt (types.submodule { freeformType = types.attrsOf types.str; }) [ { extra = 1; } ];
      errors = [ "A definition for option `test.opt.extra' is not of type `string'. Definition values:\n- In `def-1.nix': 1" ];
    };

    # ---- unknown options ---------------------------------------------------------------
    unknownOption = {
      expr =
        (lib.evalModules {
          modules = [
            {
              _file = "decl.nix";
              options.services.mk-upgrade = {
                enable = lib.mkEnableOption "mk-upgrade";
                health = mkOption {
                  type = types.int;
                  default = 1;
                };
              };
            }
            {
              _file = "user.nix";
              services.mk-upgrade.helth = 1;
            }
          ];
        }).config.services.mk-upgrade.enable;
      errors = [
        "The option `services.mk-upgrade.helth' does not exist. Definition values:\n- In `user.nix': 1"
        # nixpkgs adds "Did you mean `services.mk-upgrade.health' or ...?"; the stand-in
        # does not make suggestions
      ];
    };
    unknownOptionSubtree = {
      expr =
        (lib.evalModules {
          modules = [
            { options.services.a = mkOption { default = 1; }; }
            {
              _file = "user.nix";
              servics.foo = 1;
            }
          ];
        }).config;
      errors = [ "The option `servics' does not exist. Definition values:\n- In `user.nix':\n    {\n      foo = 1;\n    }" ];
    };
    unknownOptionInSubmodule = {
      expr = opt (types.attrsOf sub) [ { x.bogus = true; } ];
      errors = [ "The option `test.opt.x.bogus' does not exist. Definition values:\n- In `def-1.nix': true" ];
    };
    unknownOptionWithPrefix = {
      expr =
        (lib.evalModules {
          prefix = [ "outer" ];
          modules = [
            { options.a = mkOption { default = 1; }; }
            { b = 2; }
          ];
        }).config;
      errors = [ "The option `outer.b' does not exist. Definition values:\n- In `<unknown-file>': 2" ];
    };
    noOptionsInSubmodule = {
      expr = opt (types.submodule { }) [ { a = 1; } ];
      errors = [
        "The option `test.opt.a' does not exist."
        "However there are no options defined in `test.opt'. Are you sure you've"
      ];
    };
    noOptionsAtAll = {
      expr = (lib.evalModules { modules = [ { a = 1; } ]; }).config;
      errors = [
        "The option `a' does not exist."
        "It seems as if you're trying to declare an option by placing it into `config' rather than `options'!"
      ];
    };

    # ---- conflicts ---------------------------------------------------------------------
    conflictingStrDefinitions = {
      expr = opt types.str [
        "a"
        "b"
      ];
      errors = [
        "The option `test.opt' has conflicting definition values:\n- In `def-2.nix': \"b\"\n- In `def-1.nix': \"a\"\n${priorityHint}"
      ];
    };
    conflictingBoolDefinitions = {
      expr = opt types.bool [
        true
        false
      ];
      errors = [ "The option `test.opt' has conflicting definition values:\n- In `def-2.nix': false\n- In `def-1.nix': true" ];
    };
    mkDefaultsStillConflict = {
      expr = opt types.str [
        (mkDefault "a")
        (mkDefault "b")
      ];
      errors = [ "The option `test.opt' has conflicting definition values:" ];
    };
    eitherMixedDefinitions = {
      expr = opt (types.either types.int types.str) [
        1
        "a"
      ];
      errors = [
        "The option `test.opt' is defined multiple times while it's expected to be unique.\n\nDefinition values:\n- In `def-2.nix': \"a\"\n- In `def-1.nix': 1\n${priorityHint}"
      ];
    };
    uniqTwoDefinitions = {
      expr = opt (types.unique { message = "Only one please."; } (types.listOf types.str)) [
        [ "a" ]
        [ "b" ]
      ];
      errors = [ "The option `test.opt' is defined multiple times while it's expected to be unique.\nOnly one please.\nDefinition values:" ];
    };
    nullAndNotNull = {
      expr = opt (types.nullOr types.str) [
        null
        "a"
      ];
      errors = [ "The option `test.opt` is defined both null and not null, in `def-2.nix' and `def-1.nix'." ];
    };
    anythingConflictingScalars = {
      expr = opt types.anything [
        1
        2
      ];
      errors = [ "The option `test.opt' has conflicting definition values:\n- In `def-2.nix': 2\n- In `def-1.nix': 1" ];
    };
    anythingListsDoNotConcatenate = {
      expr = opt types.anything [
        [ 1 ]
        [ 2 ]
      ];
      errors = [ "The option `test.opt' has conflicting definition values:" ];
    };
    anythingConflictingTypes = {
      expr = opt types.anything [
        1
        "a"
      ];
      errors = [ "The option `test.opt' has conflicting option types in `def-2.nix' and `def-1.nix'" ];
    };
    unspecifiedCannotMerge = {
      expr = opt types.unspecified [
        1
        "a"
      ];
      errors = [ "Cannot merge definitions of `test.opt'. Definition values:\n- In `def-2.nix': \"a\"\n- In `def-1.nix': 1" ];
    };

    # ---- declarations ------------------------------------------------------------------
    readOnlySetTwice = {
      expr =
        (withOpt {
          type = types.int;
          readOnly = true;
          default = 1;
        } [ 2 ]).config.test.opt;
      errors = [
        "The option `test.opt' is read-only, but it's set multiple times. Definition values:\n- In `decl.nix': 1\n- In `def-1.nix': 2"
      ];
    };
    accessedWithoutValue = {
      expr = opt types.str [ ];
      errors = [ "The option `test.opt' was accessed but has no value defined. Try setting the option." ];
    };
    declaredTwiceWithDefaults = {
      expr =
        (lib.evalModules {
          modules = [
            {
              _file = "a.nix";
              options.x = mkOption { default = 1; };
            }
            {
              _file = "b.nix";
              options.x = mkOption { default = 2; };
            }
          ];
        }).config.x;
      errors = [ "The option `x' in `a.nix' is already declared in `b.nix'." ];
    };
    declaredTwiceWithIncompatibleTypes = {
      expr =
        (lib.evalModules {
          modules = [
            {
              _file = "a.nix";
              options.x = mkOption { type = types.str; };
            }
            {
              _file = "b.nix";
              options.x = mkOption { type = types.int; };
            }
          ];
        }).config.x;
      errors = [ "The option `x' in `a.nix' is already declared in `b.nix'." ];
    };
    optionIsParentOfOptions = {
      expr =
        (lib.evalModules {
          modules = [
            {
              _file = "a.nix";
              options.x = mkOption { type = types.str; };
            }
            {
              _file = "b.nix";
              options.x.y = mkOption { type = types.str; };
            }
          ];
        }).config.x;
      errors = [
        "The option `x' in module `a.nix' would be a parent of the following options, but its type `string' does not support nested options.\n - option(s) with prefix `x.y' in module `b.nix'"
      ];
    };
    bareTypeAsOption = {
      expr =
        (lib.evalModules {
          modules = [
            {
              _file = "a.nix";
              options.test.opt = types.str;
            }
          ];
        }).config.test.opt;
      errors = [
        "In module a.nix: expected an option declaration at option path `test.opt` but got an attribute set with type option-type"
      ];
    };
    valueWhereOptionTreeExpected = {
      expr =
        ((withOpt { type = types.str; } [ ]).extendModules {
          modules = [
            {
              _file = "bad.nix";
              test = "x";
            }
          ];
        }).config.test.opt;
      errors = [
        "In module `bad.nix', you're trying to define a value of type `string'\nrather than an attribute set for the option\n`test'!"
      ];
    };
    unsupportedModuleAttribute = {
      expr =
        (lib.evalModules {
          modules = [
            {
              options = { };
              services.x = 1;
            }
          ];
        }).config;
      errors = [ "Module `:anon-1' has an unsupported attribute `services'." ];
    };
    mkIfNonBoolean = {
      expr = opt types.str [ (mkIf "yes" "x") ];
      errors = [ "‘mkIf’ called with a non-Boolean condition" ];
    };
    mkPackageOptionMissing = {
      expr = (lib.evalModules { modules = [ { options.p = lib.mkPackageOption pkgs "not-there" { }; } ]; }).config.p;
      errors = [ "not-there cannot be found in pkgs" ];
    };
    mkPackageOptionMissingNested = {
      expr =
        (lib.evalModules {
          modules = [
            {
              options.p = lib.mkPackageOption pkgs "x" {
                default = [
                  "python3Packages"
                  "missing"
                ];
              };
            }
          ];
        }).config.p;
      errors = [ "python3Packages.missing cannot be found in pkgs" ];
    };
    definitionFileIsThePath = {
      store = true;
      expr =
        (lib.evalModules {
          modules = [
            { options.test.opt = mkOption { type = types.str; }; }
            fileModule
          ];
        }).config.test.opt;
      errors = [ (notOfType "string" (toString fileModule) "42") ];
    };

    # ---- general lib functions ---------------------------------------------------------
    toIntRejectsText = {
      expr = lib.toInt "12abc";
      errors = [ "toInt: Could not convert \"12abc\" to int." ];
    };
    toIntRejectsLeadingZero = {
      expr = lib.toInt "007";
      errors = [ "toInt: Ambiguity in interpretation of \"007\" between octal and zero padded integer." ];
    };
    lastOfEmptyList = {
      expr = lib.last [ ];
      errors = [ "lists.last: list must not be empty!" ];
    };
    getAttrFromPathMissing = {
      expr = lib.getAttrFromPath [
        "a"
        "b"
      ] { a = { }; };
      errors = [ "cannot find attribute 'a.b'" ];
    };
    throwIfTrue = {
      expr = lib.throwIf true "custom failure" 1;
      errors = [ "custom failure" ];
    };
    assertMsgFalse = {
      expr = lib.assertMsg false "assertion message";
      errors = [ "assertion message" ];
    };
    getExeOfNonDerivation = {
      expr = lib.getExe' "/bin" "sh";
      errors = [ "lib.meta.getExe': The first argument is of type string, but it should be a derivation instead." ];
    };
  };

  # What run-tests.sh evaluates.
  result =
    c:
    let
      ok = c.expr == c.expected;
    in
    {
      inherit ok;
    }
    // lib.optionalAttrs (!ok) {
      actual = lib.generators.toPretty { } c.expr;
      expected = lib.generators.toPretty { } c.expected;
    };
in
{
  inherit values failures;
  results = builtins.mapAttrs (_: result) values;
  names = {
    values = builtins.attrNames values;
    failures = builtins.attrNames failures;
    store = builtins.attrNames (lib.filterAttrs (_: c: c.store or false) (values // failures));
  };
  errors = builtins.mapAttrs (_: c: c.errors) failures;
}
